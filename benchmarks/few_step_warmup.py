"""How the warm-up of displaced mode trades quality in few-step runs: `jaxfusion eval` of the
built-in model for each step count and warm-up W (steps 0..W synchronous, the rest
displaced), the mean PSNR/SSIM against single per W; what `ParallelConfig`'s default
warm-up (`sharding.parallel.default_warmup_steps`) is chosen from.

    python benchmarks/few_step_warmup.py [--steps 4 8] [--out DIR]
        [--json docs/results/few_step_warmup.json]

Each eval writes its folder DIR/eval-s{steps}-w{W} (DIR: a new temporary folder unless
given); one whose metrics.json exists already is read, not run again (so an interrupted
sweep resumes). W runs from 0 while steps W+1.. leave a displaced step, up to 3.
"""

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVAL = "eval --height 256 --width 256 --devices 4 --steps {steps} --warmup-steps {w} --gn corrected"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--out", type=Path, help="the eval folders (default: a new temp folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from jaxfusion.files import write_text_atomically
    from sharding.parallel import default_warmup_steps

    out = args.out or Path(tempfile.mkdtemp(prefix="few-step-warmup-"))
    executable = Path(sys.executable).with_name("jaxfusion")
    records = []
    for steps in args.steps:
        for w in range(min(3, steps - 2) + 1):
            folder = out / f"eval-s{steps}-w{w}"
            arguments = EVAL.format(steps=steps, w=w) + f" --out {shlex.quote(str(folder))}"
            if not (folder / "metrics.json").is_file():
                print(f"$ jaxfusion {arguments}", flush=True)
                subprocess.run([executable, *shlex.split(arguments)], cwd=ROOT, check=True)
            metrics = json.loads((folder / "metrics.json").read_text())
            mean = metrics["mean"]
            records.append(
                {
                    "steps": steps,
                    "warmup_steps": w,
                    "displaced_steps": steps - w - 1,
                    "default": w == default_warmup_steps(steps),
                    "psnr_db": mean["displaced-corrected"]["psnr_db"],
                    "ssim": mean["displaced-corrected"]["ssim"],
                    "naive_psnr_db": mean["naive"]["psnr_db"],
                    "images": len(metrics["config"]["prompts"]) * len(metrics["config"]["seeds"]),
                }
            )
            print(json.dumps(records[-1]), flush=True)
    if args.json:
        data = {
            "command": "python benchmarks/few_step_warmup.py "
            + " ".join(["--steps", *map(str, args.steps), "--json", str(args.json)]),
            "eval_command": f"jaxfusion {EVAL} --out DIR",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "records": records,
        }
        write_text_atomically(args.json, json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
