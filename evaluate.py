"""Evaluate a checkpoint on the full test set: ``python evaluate.py --workdir W``.

  python evaluate.py --workdir ./workdir/cifar10                       # best-by-validation
  python evaluate.py --workdir ./workdir/cifar10 --checkpoint latest
  python evaluate.py --workdir ./workdir/cifar10 --checkpoint 17550 --split validation
  python evaluate.py --workdir W --depth-curve --order survival    # prune: error vs speed
  python evaluate.py --workdir W --export /tmp/pruned --remove 20  # save a pruned model
  python evaluate.py --workdir W --mc-samples 10                   # Monte-Carlo depth

Every block is active and its residual scaled (train=False); the result is printed and
written to <workdir>/eval_<checkpoint>_<split>.json. The same checkpoint always gives
bit-identical numbers.
"""

import argparse
import json
import os
import sys

from stochastic_depth_jax.training import depth, distributed


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="the training run directory")
    parser.add_argument("--checkpoint", default="best", help="'best', 'latest' or a step")
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--output", default=None, help="JSON path (default in the workdir)")
    parser.add_argument("--multihost", action="store_true")
    depth.add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    distributed.initialize(auto=args.multihost)
    from stochastic_depth_jax.training import evaluate  # After initialize: touches devices.

    analysis = depth.run_from_args(args)  # --depth-curve / --export / --mc-samples
    if analysis is None:
        result = evaluate.evaluate_checkpoint(args.workdir, args.checkpoint, args.split)
        default = os.path.join(args.workdir, f"eval_{args.checkpoint}_{args.split}.json")
    else:
        result, default = analysis
    text = json.dumps(result, indent=2)
    print(text)
    output = args.output or default
    if distributed.is_primary():
        with open(output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
