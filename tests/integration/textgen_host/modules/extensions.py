"""text-generation-webui's extension loader (`modules/extensions.py`), the parts an engine extension meets."""
import importlib
import traceback

from modules import shared

state = {}
setup_called = set()


def apply_settings(extension, name):
    # settings.yaml keys "<name>-<param>" override the extension's params before setup()
    if not hasattr(extension, "params"):
        return
    for param in extension.params:
        _id = f"{name}-{param}"
        if _id in shared.settings:
            extension.params[param] = shared.settings[_id]


def load_extensions():
    for i, name in enumerate(shared.args.extensions):
        try:
            extension = importlib.import_module(f"extensions.{name}.script")
            apply_settings(extension, name)
            if extension not in setup_called and hasattr(extension, "setup"):
                setup_called.add(extension)
                extension.setup()
            state[name] = [True, i]
        except Exception:
            traceback.print_exc()
            raise


def iterator():
    for name in sorted(state, key=lambda x: state[x][1]):
        if state[name][0]:
            yield importlib.import_module(f"extensions.{name}.script"), name


def _apply_string_extensions(function_name, text, state, is_chat=False):
    for extension, _ in iterator():
        if hasattr(extension, function_name):
            text = getattr(extension, function_name)(text, state, is_chat=is_chat)
    return text


def _apply_state_modifier_extensions(state):
    for extension, _ in iterator():
        if hasattr(extension, "state_modifier"):
            state = extension.state_modifier(state)
    return state


def _apply_custom_generate_reply():
    for extension, _ in iterator():
        if hasattr(extension, "custom_generate_reply"):
            return extension.custom_generate_reply
    return None


def _apply_custom_tokenized_length(prompt):
    for extension, _ in iterator():
        if hasattr(extension, "custom_tokenized_length"):
            return extension.custom_tokenized_length(prompt)
    return None


EXTENSION_MAP = {
    "input": lambda text, state, is_chat=False: _apply_string_extensions("input_modifier", text, state, is_chat),
    "output": lambda text, state, is_chat=False: _apply_string_extensions("output_modifier", text, state, is_chat),
    "state": _apply_state_modifier_extensions,
    "custom_generate_reply": _apply_custom_generate_reply,
    "tokenized_length": _apply_custom_tokenized_length,
}


def apply_extensions(typ, *args, **kwargs):
    if typ not in EXTENSION_MAP:
        raise ValueError(f"Invalid extension type {typ}")
    return EXTENSION_MAP[typ](*args, **kwargs)
