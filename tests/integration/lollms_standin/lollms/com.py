class LoLLMsCom:
    """The app's notification side; the stand-in records what a binding tells the user."""

    def __init__(self):
        self.messages = []

    def _note(self, kind, content):
        self.messages.append((kind, str(content)))

    def InfoMessage(self, content, client_id=None, verbose=True):
        self._note("info", content)

    def ShowBlockingMessage(self, content, client_id=None, verbose=True):
        self._note("blocking", content)

    def HideBlockingMessage(self, client_id=None, verbose=True):
        pass

    def info(self, content, duration=4, client_id=None, verbose=True):
        self._note("info", content)

    def warning(self, content, duration=4, client_id=None, verbose=True):
        self._note("warning", content)

    def success(self, content, duration=4, client_id=None, verbose=True):
        self._note("success", content)

    def error(self, content, duration=4, client_id=None, verbose=True):
        self._note("error", content)
