from enum import Enum
from pathlib import Path

import yaml

from lollms import GENERATION


class InstallOption(Enum):
    NEVER_INSTALL = 1
    INSTALL_IF_NECESSARY = 2
    FORCE_INSTALL = 3


class ConfigTemplate:
    def __init__(self, template=None):
        template = [] if template is None else template
        if not isinstance(template, list):
            raise ValueError("Template must be a list of dictionaries.")
        for entry in template:
            missing = [f for f in ("name", "value", "type") if f not in entry]
            if missing:
                raise ValueError(f"Missing fields {', '.join(missing)} in template entry.")
        self.template = template

    def __getitem__(self, key):
        for entry in self.template:
            if entry["name"] == key:
                return entry
        return None


class BaseConfig:
    def __init__(self, exceptional_keys=(), config=None, file_path=None):
        object.__setattr__(self, "exceptional_keys", list(exceptional_keys))
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "file_path", file_path)

    def _own(self, key):
        return key in self.exceptional_keys + ["config", "file_path", "copy"] or key.startswith("__")

    def __getattr__(self, key):
        if key == "exceptional_keys" or self._own(key):
            return object.__getattribute__(self, key)
        if self.config is None:
            raise ValueError("No configuration loaded.")
        return self.config[key]

    def __setattr__(self, key, value):
        if key == "exceptional_keys" or self._own(key):
            object.__setattr__(self, key, value)
        else:
            if self.config is None:
                raise ValueError("No configuration loaded.")
            self.config[key] = value

    def __getitem__(self, key):
        return self.config[key]

    def __setitem__(self, key, value):
        self.config[key] = value

    def __contains__(self, item):
        return item in self.config

    def to_dict(self):
        return self.config

    def load_config(self, file_path=None):
        file_path = Path(file_path or self.file_path)
        if not file_path.exists():
            raise FileNotFoundError(f"Configuration file not found: {file_path}")
        with open(file_path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if GENERATION == "webui" and self.config:
            # lollms-webui takes from the file only the values of keys the configuration already has
            if isinstance(data, dict):
                self.config.update({k: v for k, v in data.items() if k in self.config})
        else:
            self.config = data

    def save_config(self, file_path=None):
        file_path = Path(file_path or self.file_path)
        with open(file_path, "w") as f:
            yaml.dump(self.config, f)


_CASTS = {"int": int, "float": float, "bool": bool, "list": list,
          **{t: str for t in ("str", "text", "string", "btn", "file", "folder")}}


class TypedConfig:
    def __init__(self, config_template, config):
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "config_template", config_template)
        self.sync()

    def addConfigs(self, cfg_template):
        self.config_template.template += cfg_template
        self.sync()

    def get(self, key, default_value=None):
        return self.config[key] if key in self.config else default_value

    def __getattr__(self, key):
        if key in ("config", "config_template") or key.startswith("__"):
            return object.__getattribute__(self, key)
        return self.config[key]

    def __setattr__(self, key, value):
        if key in ("config", "config_template") or key.startswith("__"):
            object.__setattr__(self, key, value)
        else:
            self.config[key] = value
            self.sync()

    def __getitem__(self, key):
        return self.config[key]

    def __setitem__(self, key, value):
        self.config[key] = value
        self.sync()

    def sync(self):
        """Template values follow the config; config values get the template's type and min/max."""
        for entry in self.config_template.template:
            name = entry["name"]
            if name not in self.config:
                self.config[name] = entry["value"]
                continue
            if entry["type"] not in _CASTS:
                raise ValueError(f"Invalid field type '{entry['type']}' for entry '{name}'.")
            value = _CASTS[entry["type"]](self.config[name])
            if entry["type"] in ("int", "float"):
                if entry.get("min") is not None and value < entry["min"]:
                    value = entry["min"]
                if entry.get("max") is not None and value > entry["max"]:
                    value = entry["max"]
            entry["value"] = value

    def save(self, file_path=None):
        self.config.save_config(file_path=file_path)
