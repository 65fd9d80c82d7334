"""text-generation-webui's `modules.shared`: process-wide state the extension reads and sets."""
import threading
from pathlib import Path
from types import SimpleNamespace

from modules import GENERATION

model = None
tokenizer = None
model_name = "None"
stop_everything = False
generation_lock = threading.Lock()
# where settings.yaml, models and user extensions live: the web UI's folder in v2.8.1, its user_data/ today (the web UI
# runs from its own folder, which is this miniature's parent folder)
_ROOT = Path(__file__).resolve().parents[1]
user_data_dir = _ROOT / "user_data" if GENERATION == "current" else _ROOT
args = SimpleNamespace(extensions=[], verbose=False, cpu=True, loader=None, idle_timeout=0,
                       model_dir=str(user_data_dir / "models"))
settings = {"truncation_length": 2048, "max_new_tokens": 512}
default_settings = dict(settings)
