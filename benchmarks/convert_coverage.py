"""What normkit.convert leaves alone in real architectures: timm models and transformers' norm classes.

Builds one small variant of each timm architecture below (random weights, no downloads), runs
``normkit.conversion.plan`` on it and counts what is converted and what is left, with the reason; then
scans the installed transformers for norm classes (every model's modeling module) and counts which are
handled, which are copies of a handled class's code, and which are left. Nothing is timed. Needs timm and
transformers (``pip install -e ".[models]"``)::

    python benchmarks/convert_coverage.py
    python benchmarks/convert_coverage.py --out docs/benchmarks/convert/coverage.json
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import pkgutil
import warnings
from pathlib import Path

import timm
import torch
import transformers

import normkit
from normkit.bench.machine import machine_info
from normkit.conversion.handlers import FAMILIES, handler_for

#: one small variant per architecture family, CNNs, vision transformers and hybrids
TIMM_MODELS = [
    "resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv4_conv_small",
    "convnext_atto", "convnextv2_atto", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224", "regnetx_002", "regnety_002", "ghostnet_100", "fastvit_t8",
    "efficientvit_b0", "levit_128s", "mobilevit_xxs", "poolformer_s12", "edgenext_xx_small",
    "eva02_tiny_patch14_224", "coatnet_nano_rw_224", "maxvit_nano_rw_256", "nfnet_f0", "dla34", "densenet121",
    "cspresnet50", "repvgg_a0", "rexnet_100", "tinynet_a", "hgnetv2_b0", "caformer_s18", "efficientformerv2_s0",
    "tiny_vit_5m_224", "nextvit_small", "inception_next_atto", "hiera_tiny_224", "mambaout_femto",
    "starnet_s050", "fasternet_t0", "rdnet_tiny", "vitamin_small_224", "davit_tiny", "focalnet_tiny_srf",
    "pvt_v2_b0", "xcit_nano_12_p16_224", "cait_xxs24_224", "crossvit_tiny_240", "gcvit_xxtiny", "sequencer2d_s",
    "resmlp_12_224", "mixer_s32_224", "beit_base_patch16_224", "volo_d1_224", "twins_svt_small", "convmixer_768_32",
    "res2net50_14w_8s", "selecsls42b", "hrnet_w18_small", "tresnet_m", "vovnet39a", "lcnet_050", "mnasnet_small",
    "fbnetc_100", "gernet_s", "resnet50_gn", "efficientnet_b0_gn",
]


def timm_coverage() -> dict:
    converted: collections.Counter = collections.Counter()
    left: dict[str, dict] = {}
    built, failed = [], {}
    for name in TIMM_MODELS:
        try:
            model = timm.create_model(name, pretrained=False)
        except Exception as e:  # not in this timm version
            failed[name] = f"{type(e).__name__}: {e}"[:200]
            continue
        built.append(name)
        report = normkit.conversion.plan(model)
        converted.update(s.original.rsplit(".", 1)[-1] for s in report.converted)
        for s in report.left:
            entry = left.setdefault(s.original, {"reason": s.reason, "modules": 0, "models": []})
            entry["modules"] += 1
            if name not in entry["models"]:
                entry["models"].append(name)
        print(f"timm {name}: {len(report.converted)} converted, {len(report.left)} left")
    return {"models": built, "not_built": failed, "converted": dict(converted), "left": left}


def transformers_coverage() -> dict:
    handled, copies, left = [], collections.defaultdict(list), []
    for info in pkgutil.iter_modules(transformers.models.__path__):
        try:
            module = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        except Exception:
            continue
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and cls.__module__ == module.__name__ and issubclass(cls, torch.nn.Module)):
                continue
            if not normkit.conversion._NORMISH.search(cls.__name__):
                continue
            path = f"{cls.__module__}.{cls.__qualname__}"
            handler = handler_for(cls)
            if handler is None:
                left.append(path)
            elif path in FAMILIES or path in normkit.conversion.known_classes():
                handled.append(path)
            else:
                copies[_family(cls)].append(path)
    return {
        "handled": sorted(handled),
        "copies": {k: sorted(v) for k, v in copies.items()},
        "left": sorted(left),
    }


def _family(cls: type) -> str:
    from normkit.conversion.families import family_of

    return family_of(cls, FAMILIES) or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    result = {
        "machine": machine_info(),
        "versions": {"timm": timm.__version__, "transformers": transformers.__version__},
        "timm": timm_coverage(),
        "transformers": transformers_coverage(),
    }
    t, h = result["timm"], result["transformers"]
    print(f"\ntimm: {len(t['models'])} architectures built, {sum(t['converted'].values())} modules converted")
    for path, entry in sorted(t["left"].items(), key=lambda kv: -kv[1]["modules"]):
        print(f"  left {entry['modules']:4d} x {path} ({entry['reason']}) in {', '.join(entry['models'])}")
    n_copies = sum(len(v) for v in h["copies"].values())
    print(f"transformers: {len(h['handled'])} handled classes, {n_copies} copies of them, "
          f"{len(h['left'])} norm-like classes left")
    for family, members in sorted(h["copies"].items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(members):4d} copies of {family.rsplit('.', 1)[-1]}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
