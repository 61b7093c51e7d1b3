"""`llip` command line: parses and dispatches, nothing more. Each command's logic lives in its stage's
module (docs/architecture.md), which has `add_args(parser)` and `cli(args) -> int`; modules import
ray/mlflow lazily so `llip --help` and `llip validate` are fast."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from orchestrator.errors import UserError

# name -> (module, one-line help)
COMMANDS = {
    "init": ("orchestrator.config.starter", "write a starter experiments/ folder inheriting the shipped defaults"),
    "validate": ("orchestrator.config.validate", "validate experiment YAML files against the schema"),
    "run": ("orchestrator.training.driver", "train one experiment on a Ray cluster (local by default)"),
    "sweep": ("orchestrator.sweeps.tune", "run the experiment's sweep: section with Ray Tune"),
    "eval": ("orchestrator.evaluation.standalone", "zero-shot and retrieval on eval sets for a run or a checkpoint; logs to MLflow"),
    "export": ("orchestrator.models.export", "a run's or checkpoint's weights as a folder others load (llip_core.pretrained, or open_clip's local-dir:)"),
    "import-official": ("orchestrator.models.official", "the released Llip weights (facebookresearch/Llip .pt) as an export folder"),
    "register": ("orchestrator.models.register", "register a run's MLflow model under a name with an alias (models:/NAME@ALIAS)"),
    "compare": ("orchestrator.tracking.compare", "table of a sweep's trials from MLflow, sorted by its metric"),
    "report": ("orchestrator.tracking.report", "a sweep's configurations over seeds (mean, std, n; paired vs a baseline) as report/ on its parent run"),
    "submit": ("orchestrator.jobs.submit", "submit a run or sweep to a remote Ray cluster as a Ray job"),
    "shards": ("orchestrator.data.shards", "write WebDataset shards (local or s3://) from a data source"),
    "sizes": ("orchestrator.data.sizes", "count existing shards' samples once into a sizes.json beside them (open_clip's format)"),
    "metadata": ("orchestrator.curation.metadata", "build a MetaCLIP-format metadata list (WordNet + word lists)"),
    "curate": ("orchestrator.curation.curate", "MetaCLIP-curate the experiment's data.train (its curation: section)"),
}


class _VersionAction(argparse.Action):
    # Computed only when asked: the commit lookup runs git.
    def __call__(self, parser, namespace, values, option_string=None):
        from orchestrator.tracking.store import git_commit, package_version

        commit = git_commit()
        print(f"llip-orch {package_version()}" + (f" (commit {commit})" if commit != "unknown" else ""))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llip", description="Llip / CLIP / SigLIP experiments on Ray, tracked in MLflow")
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="print the version and git commit, then exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_module=None)
            continue
        mod.add_args(p)
        p.add_argument("--verbose", action="store_true",
                       help="show all of Ray's worker output (Train's per-report lines, Data's banners)")
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._module is None:
        print(f"llip: error: '{args.command}' is not available in this build", file=sys.stderr)
        return 2
    if args.verbose:
        os.environ["LLIP_VERBOSE"] = "1"  # read where Ray starts, possibly in another module
    try:
        return int(args._module.cli(args) or 0)
    except UserError as e:
        print(f"llip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
