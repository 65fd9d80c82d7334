"""text-generation-webui's `modules.shared`: process-wide state the extension reads and sets."""
import threading
from types import SimpleNamespace

model = None
tokenizer = None
model_name = "None"
stop_everything = False
generation_lock = threading.Lock()
args = SimpleNamespace(extensions=[], verbose=False, cpu=True, loader=None, idle_timeout=0)
settings = {"truncation_length": 2048, "max_new_tokens": 512}
