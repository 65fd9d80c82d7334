"""text-generation-webui's extension loader (`modules/extensions.py`), the parts an engine extension meets."""
import importlib
import importlib.util
import sys
import traceback

from modules import GENERATION, shared

state = {}
setup_called = set()


def apply_settings(extension, name):
    # settings.yaml keys "<name>-<param>" override the extension's params before setup()
    if not hasattr(extension, "params"):
        return
    for param in extension.params:
        _id = f"{name}-{param}"
        shared.default_settings[_id] = extension.params[param]
        if _id in shared.settings:
            extension.params[param] = shared.settings[_id]


def _import(name):
    """v2.8.1: the package module `extensions.<name>.script`. Today a `user_data/extensions/<name>/script.py` is
    preferred, loaded from its file as the plain module `user_ext_<name>` (so no relative imports there)."""
    user_script = shared.user_data_dir / "extensions" / name / "script.py"
    if GENERATION == "current" and user_script.exists():
        spec = importlib.util.spec_from_file_location(f"user_ext_{name}", str(user_script))
        extension = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = extension
        spec.loader.exec_module(extension)
        return extension
    return importlib.import_module(f"extensions.{name}.script")


def load_extensions():
    for i, name in enumerate(shared.args.extensions):
        try:
            extension = _import(name)
            if extension not in setup_called:
                apply_settings(extension, name)
                if hasattr(extension, "setup"):
                    extension.setup()
                setup_called.add(extension)
            state[name] = [True, i, extension]
        except ModuleNotFoundError:
            print(f"Could not import the requirements for '{name}'.")
            if GENERATION == "current":
                raise                      # today a missing requirement stops the start
            traceback.print_exc()
        except Exception:
            # the web UI goes on without the extension; only its console says why
            print(f'Failed to load the extension "{name}".')
            traceback.print_exc()


def iterator():
    for name in sorted(state, key=lambda x: state[x][1]):
        if state[name][0]:
            yield state[name][2], name


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
