"""The main job: harvest → train → eval on the embedded default model, offline.

SmolLM2-135M at blocks.6.hook_resid_post (see config.DEFAULT_HOOK for why that layer),
400k activations from the embedded corpus, a TopK SAE with 4096 latents and k = 32 trained
for two epochs. Budgeted to finish in under 10 minutes on 2 CPU cores; every stage resumes
if interrupted.
"""

from __future__ import annotations

import logging
import sys
import time

from saelab.config import EvalConfig, HarvestConfig, SAEConfig, TrainConfig
from saelab.evaluate import evaluate, summary_table
from saelab.harvest import harvest
from saelab.trainer import train

log = logging.getLogger(__name__)


def demo(quick: bool = False, runs_dir: str = "runs") -> int:
    n_tokens = 40_000 if quick else 400_000
    t0 = time.perf_counter()
    hcfg = HarvestConfig(n_tokens=n_tokens, name="smollm2-135m-demo" + ("-quick" if quick else ""))
    path = harvest(hcfg)
    t_harvest = time.perf_counter() - t0

    eval_tokens = n_tokens // 10
    tcfg = TrainConfig(
        harvest=str(path),
        sae=SAEConfig(arch="topk", d_sae=1024 if quick else 4096, k=32),
        out=f"{runs_dir}/demo-topk" + ("-quick" if quick else ""),
        n_tokens=2 * (n_tokens - eval_tokens),
        eval_tokens=eval_tokens,
        # A latent silent for a fifth of this short run is as good as dead.
        dead_tokens=n_tokens // 5,
        batch_size=2048 if quick else 4096,
    )
    run = train(tcfg)
    t_train = time.perf_counter() - t0 - t_harvest

    result = evaluate(EvalConfig(run=str(run)))
    total = time.perf_counter() - t0
    sys.stdout.write(
        "\n" + summary_table([(str(run), result)]) + "\n\n"
        f"harvest {t_harvest:.0f} s, train {t_train:.0f} s, total {total:.0f} s\n"
        f"run: {run}  (eval.json, train_log.jsonl, cfg.json)\n"
    )
    return 0
