"""`lollms/binding.py`: the LLMBinding base class and the BindingBuilder loader, in both generations (../README.md).

Where the generations differ a binding can tell:
* the constructor's 6th argument: `supported_file_extensions` (11.0.0) or `SAFE_STORE_SUPPORTED_FILE_EXTENSIONS`
  (lollms-webui since 2025-05-23); the other keyword is a TypeError, as in the real class;
* `stop_generation()` (webui only: its Stop button calls it), and the token counter `get_nb_tokens` (11.0.0) renamed
  `count_tokens` (webui), which the personality calls before generating.
"""
import importlib.machinery
from pathlib import Path

from lollms import GENERATION
from lollms.config import InstallOption, TypedConfig
from lollms.main_config import LOLLMSConfig  # noqa: F401  (bindings import it from here)
from lollms.types import BindingType


class _LLMBindingBase:
    def _setup(self, binding_dir, lollms_paths, config, binding_config, installation_option, binding_type,
               models_dir_names, lollmsCom):
        self.binding_type = binding_type
        self.binding_dir = binding_dir
        self.binding_folder_name = binding_dir.stem
        self.lollms_paths = lollms_paths
        self.config = config
        self.binding_config = binding_config
        self.lollmsCom = lollmsCom
        self.add_default_configurations(binding_config)
        self.seed = config["seed"]
        self.sync_configuration(self.binding_config, lollms_paths)
        if (not self.configuration_file_path.exists() or installation_option == InstallOption.FORCE_INSTALL) \
                and installation_option != InstallOption.NEVER_INSTALL:
            self.install()
            self.binding_config.config.save_config()
        else:
            self.load_binding_config()
        names = models_dir_names if models_dir_names is not None else [self.binding_folder_name]
        config.lollms_paths.binding_models_paths = [config.lollms_paths.personal_models_path / n for n in names]
        self.models_folders = config.lollms_paths.binding_models_paths
        self.models_dir_names = names
        for folder in self.models_folders:
            folder.mkdir(parents=True, exist_ok=True)

    def add_default_configurations(self, binding_config):
        binding_config.addConfigs([
            {"name": "model_name", "type": "str", "value": "", "help": "Last known model for fast model recovery"},
            {"name": "model_template", "type": "text", "value": "", "help": "The template for the model"},
            {"name": "clip_model_name", "type": "str", "value": "ViT-L-14/openai", "help": "images"},
            {"name": "caption_model_name", "type": "str", "value": "blip-large", "help": "images"},
            {"name": "vqa_model_name", "type": "str", "value": "Salesforce/blip-vqa-capfilt-large", "help": "images"},
        ])

    def sync_configuration(self, binding_config, lollms_paths):
        self.configuration_file_path = (lollms_paths.personal_configuration_path / "bindings"
                                        / self.binding_folder_name / "config.yaml")
        self.configuration_file_path.parent.mkdir(parents=True, exist_ok=True)
        binding_config.config.file_path = self.configuration_file_path

    def load_binding_config(self):
        try:
            self.binding_config.config.load_config()
        except Exception:
            self.binding_config.config.save_config()
        self.binding_config.sync()

    # -- models folders: how "add reference to local model" (lollms_models_infos.py) writes a reference
    def searchModelFolder(self, model_name):
        for folder in self.models_folders:
            if folder.name in model_name.lower():
                return folder
        return self.models_folders[0]

    def reference_model(self, path):
        path = Path(str(path).replace("\\", "/"))
        model_name = path.stem + ".reference"
        # the real code compares the suffix with "gguf" (no dot), so the folder is always the full file name
        folder = self.searchModelFolder(model_name) / (path.stem if path.suffix.lower() == "gguf" else path.name)
        target = folder / model_name
        if target.exists():
            return False
        folder.mkdir(parents=True, exist_ok=True)
        target.write_text(str(path))
        self.InfoMessage("Reference created")
        return True

    # -- notifications: the real base class forwards them to the app with keywords
    def InfoMessage(self, content, client_id=None, verbose=True):
        if self.lollmsCom:
            return self.lollmsCom.InfoMessage(content=content, client_id=client_id, verbose=verbose)

    def ShowBlockingMessage(self, content, client_id=None, verbose=True):
        if self.lollmsCom:
            return self.lollmsCom.ShowBlockingMessage(content=content, client_id=client_id, verbose=verbose)

    def HideBlockingMessage(self, client_id=None, verbose=True):
        if self.lollmsCom:
            return self.lollmsCom.HideBlockingMessage(client_id=client_id, verbose=verbose)

    def info(self, content, duration=4, client_id=None, verbose=True):
        if self.lollmsCom:
            return self.lollmsCom.info(content=content, duration=duration, client_id=client_id, verbose=verbose)

    def warning(self, content, duration=4, client_id=None, verbose=True):
        if self.lollmsCom:
            return self.lollmsCom.warning(content=content, duration=duration, client_id=client_id, verbose=verbose)

    def success(self, content, duration=4, client_id=None, verbose=True):
        if self.lollmsCom:
            return self.lollmsCom.success(content=content, duration=duration, client_id=client_id, verbose=verbose)

    def error(self, content, duration=4, client_id=None, verbose=True):
        if self.lollmsCom:
            return self.lollmsCom.error(content=content, duration=duration, client_id=client_id, verbose=verbose)

    # -- what bindings override
    def settings_updated(self):
        pass

    def build_model(self, model_name=None):
        self.model_name = model_name if model_name is not None else self.config.model_name

    def destroy_model(self):
        pass

    def install(self):
        print(f"Installing {self.binding_folder_name}")

    def uninstall(self):
        print(f"UnInstalling {self.binding_folder_name}")

    def generate(self, prompt, n_predict=128, callback=None, verbose=False, **gpt_params):
        pass

    def tokenize(self, prompt):
        return prompt.split(" ")

    def detokenize(self, tokens_list):
        return " ".join(tokens_list)

    def list_models(self):
        return [f.name for folder in self.models_folders for f in folder.iterdir()
                if f.is_dir() and not f.stem.startswith(".") or f.suffix == ".reference"]


if GENERATION == "11.0.0":
    class LLMBinding(_LLMBindingBase):
        def __init__(self, binding_dir, lollms_paths, config, binding_config: TypedConfig,
                     installation_option=InstallOption.INSTALL_IF_NECESSARY, supported_file_extensions="*.bin",
                     binding_type=BindingType.TEXT_ONLY, models_dir_names=None, lollmsCom=None):
            self.supported_file_extensions = supported_file_extensions
            self._setup(binding_dir, lollms_paths, config, binding_config, installation_option, binding_type,
                        models_dir_names, lollmsCom)

        def get_nb_tokens(self, prompt):
            return len(self.tokenize(prompt))
else:
    class LLMBinding(_LLMBindingBase):
        def __init__(self, binding_dir, lollms_paths, config, binding_config: TypedConfig,
                     installation_option=InstallOption.INSTALL_IF_NECESSARY, SAFE_STORE_SUPPORTED_FILE_EXTENSIONS="*.bin",
                     binding_type=BindingType.TEXT_ONLY, models_dir_names=None, lollmsCom=None):
            self.SAFE_STORE_SUPPORTED_FILE_EXTENSIONS = SAFE_STORE_SUPPORTED_FILE_EXTENSIONS
            self._setup(binding_dir, lollms_paths, config, binding_config, installation_option, binding_type,
                        models_dir_names, lollmsCom)

        def stop_generation(self):
            """Requests the generation thread to stop (the model must implement this)."""

        def count_tokens(self, prompt):
            return len(self.tokenize(prompt))


class BindingBuilder:
    def build_binding(self, config, lollms_paths, installation_option=InstallOption.INSTALL_IF_NECESSARY,
                      lollmsCom=None):
        binding = self.getBinding(config, lollms_paths)
        return binding(config, lollms_paths=lollms_paths, installation_option=installation_option,
                       lollmsCom=lollmsCom)

    def getBinding(self, config, lollms_paths):
        if len(str(config.binding_name).split("/")) > 1:
            binding_path = Path(config.binding_name)
        else:
            binding_path = lollms_paths.bindings_zoo_path / config["binding_name"]
        absolute_path = binding_path.resolve()
        module_name = binding_path.stem
        loader = importlib.machinery.SourceFileLoader(module_name, str(absolute_path / "__init__.py"))
        binding_module = loader.load_module()
        return getattr(binding_module, binding_module.binding_name)


class ModelBuilder:
    def __init__(self, binding):
        self.binding = binding
        self.model = None
        self.build_model()

    def build_model(self, model_name=None):
        self.model = self.binding.build_model(model_name)

    def get_model(self):
        return self.model
