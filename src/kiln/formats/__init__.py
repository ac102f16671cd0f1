"""The on-disk forms of a model: kiln checkpoint weights + config, the Hugging Face layout (and, as they
land, GGUF and PEFT adapters). Every stage that reads or writes a model's weights goes through here.

    checkpoint.py  kiln checkpoint directories: find, read the config, load the weights
    hf.py          config.json and safetensors weights under Hugging Face names
"""
