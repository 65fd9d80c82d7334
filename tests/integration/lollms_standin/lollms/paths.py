from pathlib import Path


class LollmsPaths:
    def __init__(self, personal_path=None, bindings_zoo_path=None):
        self.personal_path = Path(personal_path or Path.home() / "lollms_data").resolve()
        self.personal_configuration_path = self.personal_path / "configs"
        self.personal_models_path = self.personal_path / "models"
        self.bindings_zoo_path = Path(bindings_zoo_path or self.personal_path / "bindings_zoo")
        self.models_zoo_path = self.personal_path / "models_zoo"
        self.binding_models_paths = []
        for p in (self.personal_configuration_path, self.personal_models_path):
            p.mkdir(parents=True, exist_ok=True)
