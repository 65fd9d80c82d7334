"""text-generation-webui's generation driver (`modules/text_generation.py`), as it treats an extension's generator.

v2.8.1 passes the seed it drew to `custom_generate_reply` positionally; the current generation (from ae02ffc6) does not.
"""
import ast
import copy
import random

import numpy as np

from modules import GENERATION, shared
from modules.extensions import apply_extensions


def generate_reply(*args, **kwargs):
    shared.generation_lock.acquire()
    try:
        for result in _generate_reply(*args, **kwargs):
            yield result
    finally:
        shared.generation_lock.release()


def set_manual_seed(seed):
    seed = int(seed)
    if seed == -1:
        seed = random.randint(1, 2**31)
    return seed


def _generate_reply(question, state, stopping_strings=None, is_chat=False, escape_html=False, for_ui=False):
    generate_func = apply_extensions("custom_generate_reply")
    if generate_func is None:
        if shared.model_name == "None" or shared.model is None:
            yield ""
            return
        raise RuntimeError("the miniature host has no built-in loaders")

    original_question = question
    if not is_chat:
        state = apply_extensions("state", state)
        question = apply_extensions("input", question, state)

    all_stop_strings = []
    for st in (stopping_strings, state["custom_stopping_strings"]):
        if type(st) is str:
            st = ast.literal_eval(f"[{st}]")
        if type(st) is list and len(st) > 0:
            all_stop_strings += st

    shared.stop_everything = False
    reply = ""
    is_stream = state["stream"]
    if len(all_stop_strings) > 0 and not state["stream"]:
        stop_event_ref = state.pop("stop_event", None)
        state = copy.deepcopy(state)
        if stop_event_ref is not None:
            state["stop_event"] = stop_event_ref
        state["stream"] = True

    if GENERATION == "v2.8.1":
        seed = set_manual_seed(state["seed"])
        replies = generate_func(question, original_question, seed, state, stopping_strings, is_chat=is_chat)
    else:
        replies = generate_func(question, original_question, state, stopping_strings, is_chat=is_chat)

    for reply in replies:
        reply, stop_found = apply_stopping_strings(reply, all_stop_strings)
        if is_stream:
            yield reply
        stop_event = state.get("stop_event")
        if stop_found or shared.stop_everything or (stop_event and stop_event.is_set()):
            break

    if not is_chat:
        reply = apply_extensions("output", reply, state)
    yield reply


def apply_stopping_strings(reply, all_stop_strings):
    stop_found = False
    for string in all_stop_strings:
        idx = reply.find(string)
        if idx != -1:
            reply = reply[:idx]
            stop_found = True
            break
    if not stop_found:
        # a reply ending in the start of a stop string ("\nYo" before "\nYou:") is trimmed
        for string in all_stop_strings:
            for j in range(len(string) - 1, 0, -1):
                if reply[-j:] == string[:j]:
                    reply = reply[:-j]
                    break
            else:
                continue
            break
    return reply, stop_found


def stop_everything_event():
    shared.stop_everything = True


def encode(prompt, add_special_tokens=True, add_bos_token=True, truncation_length=None):
    if shared.tokenizer is None:
        raise ValueError("No tokenizer is loaded")
    input_ids = shared.tokenizer.encode(str(prompt), return_tensors="pt", add_special_tokens=add_special_tokens)
    bos = getattr(shared.tokenizer, "bos_token_id", None)
    if bos is not None:
        if add_bos_token:
            if len(input_ids[0]) == 0 or input_ids[0][0] != bos:
                input_ids = np.concatenate([np.array([[bos]]), np.asarray(input_ids)], axis=1)
            while len(input_ids[0]) > 1 and input_ids[0][0] == bos and input_ids[0][1] == bos:
                input_ids = input_ids[:, 1:]
        else:
            while len(input_ids[0]) > 0 and input_ids[0][0] == bos:
                input_ids = input_ids[:, 1:]
    if truncation_length is not None:
        input_ids = input_ids[:, -truncation_length:]
    return input_ids


def decode(output_ids, skip_special_tokens=True):
    if shared.tokenizer is None:
        raise ValueError("No tokenizer is loaded")
    return shared.tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)


def get_encoded_length(prompt):
    length_after_extensions = apply_extensions("tokenized_length", prompt)
    if length_after_extensions is not None:
        return length_after_extensions
    return len(encode(prompt)[0])
