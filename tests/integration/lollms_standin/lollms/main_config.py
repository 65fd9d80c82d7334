from lollms.config import BaseConfig
from lollms.paths import LollmsPaths

DEFAULT_CONFIG = {"binding_name": "", "model_name": "", "seed": -1, "ctx_size": 2048, "max_n_predict": 1024,
                  "temperature": 0.9, "top_k": 50, "top_p": 0.95, "repeat_last_n": 40, "repeat_penalty": 1.2,
                  "n_threads": 8}


class LOLLMSConfig(BaseConfig):
    def __init__(self, file_path=None, lollms_paths=None):
        super().__init__(["file_path", "config", "lollms_paths"])
        self.file_path = file_path
        if file_path is not None:
            self.load_config(file_path)
        else:
            self.config = DEFAULT_CONFIG.copy()
        self.lollms_paths = lollms_paths if lollms_paths is not None else LollmsPaths()
