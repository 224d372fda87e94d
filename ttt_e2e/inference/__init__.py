"""Constant-latency inference for TTT-E2E (docs/METHOD.md section 4) and its baselines.

    out = generate(model, ttt_cfg, prompt_ids, max_new_tokens, temperature=0.8, top_p=0.95, stop_tokens=[eos])

Lower level (the tests and the latency benchmark): state = start(model, ttt_cfg, batch); logits = feed(state, ids).
"""
from .engine import InferenceState, feed, start
from .graphs import InferenceGraphs
from .generation import GenerateOutput, generate
from .kv_cache import KVCache
from .memory import check_memory, estimate_bytes
from .sampling import sample

__all__ = ["GenerateOutput", "InferenceGraphs", "InferenceState", "KVCache", "check_memory", "estimate_bytes", "feed",
           "generate", "sample", "start"]
