"""The estimator: parameters, memory, tokens, FLOPs, time and cost by arithmetic on a ModelConfig and the
hardware table, before any weight exists (`kiln estimate`), and the estimate `kiln pretrain` prints at start.

    presets.py   named sizes (124m ... 70b) and Hugging Face config.json as ModelConfig values
    hardware.py  GPU memory and dense bf16 FLOP/s, each with its source
    memory.py    parameter counts, training memory per GPU by part and phase, inference memory, KV cache
    gguf.py      GGUF bytes per tensor and per file for each quantisation type
    estimate.py  one configuration in, the table and JSON out
"""
