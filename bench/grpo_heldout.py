"""Greedy accuracy of a GRPO run's start and end on problems it never trained on, paired item by item.

    python bench/grpo_heldout.py --run /tmp/smolgrpo [--base CKPT] [--extra 300] [--threads 2] [--out PATH]

The problems: the run's own held-out ones (grpo.eval_items) plus --extra training problems the run never drew
(its problem stream is a seeded permutation: the first max_steps x prompts_per_step were drawn; questions equal
to a drawn one are skipped). Both models decode greedily with kiln's engine (fp32, batches of 50, on --device) with
the run's prompts and max_new_tokens, scored by the task's verifier. Prints accuracies and the paired counts
(right only after / only before: McNemar's test), writes bench/results/grpo_heldout.json.
"""
import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from kiln.formats.checkpoint import latest_checkpoint, load_model  # noqa: E402
from kiln.infer.engine import Engine  # noqa: E402
from kiln.infer.sampling import SamplingParams  # noqa: E402
from kiln.post.grpo import load_problems  # noqa: E402
from kiln.post.rollouts import sample_completions  # noqa: E402
from kiln.tokenizer import Tokenizer  # noqa: E402
from kiln.formats.checkpoint import checkpoint_config  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--run", required=True, help="the GRPO run directory")
ap.add_argument("--base", default=None, help="the start's checkpoint (default: the run's grpo.base)")
ap.add_argument("--extra", type=int, default=300)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--device", default="auto", help="auto: CUDA where there is one, else the CPU (fp32 on both)")
ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_heldout.json"))
a = ap.parse_args()
torch.set_num_threads(a.threads)
device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
run = Path(a.run)
end = latest_checkpoint(run / "checkpoints")
cfg = checkpoint_config(end)
base = Path(a.base or cfg.grpo.base)
base = base if (base / "state.json").exists() else latest_checkpoint(base / "checkpoints")
sec, seed = cfg.grpo, cfg.train.seed
tok = Tokenizer.from_file(run / "tokenizer" / "tokenizer.json")
task, train, held, report = load_problems(sec, tok, seed, 8192, lambda *a, **k: None)
drawn_n = sec.train.max_steps * sec.prompts_per_step
perm = np.random.default_rng([seed, 0]).permutation(len(train))
drawn = {train[int(i)].item.question for i in perm[:drawn_n]}
unseen = [train[int(i)] for i in perm[drawn_n:] if train[int(i)].item.question not in drawn][:a.extra]
problems = held + unseen
print(f"{len(held)} held-out + {len(unseen)} never drawn ({drawn_n} drawn in training)", flush=True)
stop = set(tok.stop_ids)
res = {}
for name, ckpt in (("start", base), ("end", end)):
    model, _ = load_model(ckpt, device, torch.float32)
    eng = Engine(model, None, max_slots=50, max_len=max(len(p.prompt_ids) for p in problems) + sec.max_new_tokens,
                 max_queue=len(problems) + 1, cuda_graphs=False, prefix_cache=False)
    ok = []
    for i in range(0, len(problems), 50):
        chunk = problems[i:i + 50]
        greedy = [SamplingParams(max_tokens=sec.max_new_tokens, temperature=0.0)] * len(chunk)
        outs = sample_completions(eng, [p.prompt_ids for p in chunk], greedy, stop)
        for p, (ids,) in zip(chunk, outs):
            text = tok.decode([t for t in ids if t not in stop], skip_special=True)
            ok.append(float(task.score(text, p.item)) >= 1.0)
    res[name] = ok
    print(f"{name}: held-out {np.mean(ok[:len(held)]):.3f}, never drawn {np.mean(ok[len(held):]):.3f}, "
          f"all {np.mean(ok):.3f}", flush=True)
x, y = np.array(res["start"]), np.array(res["end"])
gain, loss = int((~x & y).sum()), int((x & ~y).sum())
chi2 = (gain - loss) ** 2 / max(gain + loss, 1)
print(f"paired over {len(x)}: right only after {gain}, only before {loss}, both {int((x & y).sum())}; "
      f"McNemar chi2 {chi2:.1f} (3.84: p = 0.05)")
out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": str(run), "start": str(base),
       "end": str(end), "task": sec.task, "task_config": sec.task_config, "held_out": len(held),
       "never_drawn": len(unseen), "accuracy": {k: float(np.mean(v)) for k, v in res.items()},
       "right_only_after": gain, "right_only_before": loss, "mcnemar_chi2": chi2,
       "per_item": {k: [bool(v) for v in vs] for k, vs in res.items()}}
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {a.out}")
