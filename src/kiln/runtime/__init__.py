"""Runtime facts below every stage: device, precision, autocast, SDPA backends, GPU peaks and MFU.

    device.py  pick_device, use_bf16, autocast, configure_torch, sdpa_backend, memory counters
    peaks.py   the dense bf16 peak table, a matmul timed here, MFU
"""
