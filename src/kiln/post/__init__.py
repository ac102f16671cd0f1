"""Post-training: SFT, DPO and GRPO as tasks of the one training loop (kiln/train/loop.py).

    chat_data.py   conversations from files and built-in sets, counted and cleaned
    sources.py     the built-in sets that ship in packages (sharegpt, chitchat, chatterbot)
    reasoning.py   reasoning-gym tasks: prompts, answer extraction, verifiers
    common.py      start from a base's weights, the stage's run directory, LoRA, the trainer
    sft.py         supervised fine-tuning (assistant-only loss, packed with document masks or padded)
    dpo.py         Direct Preference Optimisation; pairs.py reads and builds preference pairs
    grpo.py        group-relative policy optimisation: the loss and the stage
    rollouts.py    GRPO's batch source: groups sampled with kiln's own engine, rewards, advantages
"""
