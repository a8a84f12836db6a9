"""The main job: harvest → train → eval → dark matter on the embedded default model, offline.

SmolLM2-135M at blocks.6.hook_resid_post (see config.DEFAULT_HOOK for why that layer),
400k activations from the embedded corpus, a TopK SAE with 4096 latents and k = 32 trained
for two epochs, then held-out reconstruction and downstream CE (spliced on 64 contexts) and
the dark-matter analysis (Engels et al., arXiv 2410.14670) on the held-out rows, then the
feature index the app browses. Budgeted to
finish in under 10 minutes on 2 CPU cores; harvest and training resume if interrupted.
"""

from __future__ import annotations

import logging
import sys
import time

from saelab.config import DarkMatterConfig, EvalConfig, HarvestConfig, SAEConfig, TrainConfig
from saelab.darkmatter import prepare, run_one, summary_lines
from saelab.evaluate import evaluate, summary_table
from saelab.features import build_index
from saelab.harvest import harvest
from saelab.trainer import train

log = logging.getLogger(__name__)


def demo(quick: bool = False, runs_dir: str = "runs") -> int:
    n_tokens = 40_000 if quick else 400_000
    t0 = time.perf_counter()
    out = "cached_activations/smollm2-135m-demo" + ("-quick" if quick else "")
    hcfg = HarvestConfig(n_tokens=n_tokens, out=out)
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

    result = evaluate(EvalConfig(run=str(run), ce_contexts=16 if quick else 64))
    t_eval = time.perf_counter() - t0 - t_harvest - t_train

    dcfg = DarkMatterConfig(ce_contexts=8 if quick else 16)
    dark = run_one(prepare(run, dcfg), dcfg)
    t_dark = time.perf_counter() - t0 - t_harvest - t_train - t_eval

    index = build_index(run)
    t_index = time.perf_counter() - t0 - t_harvest - t_train - t_eval - t_dark
    total = time.perf_counter() - t0
    parts = [
        summary_table([(str(run), result)]),
        _downstream_line(result) + "\n",
        summary_lines(dark) + "\n",
        f"harvest {t_harvest:.0f} s, train {t_train:.0f} s, eval {t_eval:.0f} s, "
        f"dark matter {t_dark:.0f} s, feature index {t_index:.0f} s, total {total:.0f} s",
        f"run: {run}  (eval.json, darkmatter.json, darkmatter_tokens.sqlite, {index.name}, "
        "figures/, train_log.jsonl, cfg.json)",
        f"browse it: saelab app {runs_dir}",
    ]
    sys.stdout.write("\n" + "\n".join(parts) + "\n")
    return 0


def _downstream_line(result: dict) -> str:
    ds = result.get("downstream", {})
    if "variants" not in ds:
        return f"downstream: skipped ({ds.get('skipped', 'off')})"
    return (
        f"downstream ({ds['n_contexts']} held-out contexts, {ds['n_tokens']:,} tokens): "
        f"CE score {result['ce_score']:.3f}, ΔCE {result['delta_ce']:.3f} "
        f"± {result['delta_ce_se'] or 0:.3f} nats "
        f"(clean {ds['ce_clean']:.3f}, zero-ablation {ds['ce_ablation']:.3f}), "
        f"KL score {result['kl_score']:.3f}"
    )
