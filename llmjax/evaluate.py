"""Evaluate a checkpoint: python -m llmjax.evaluate --workdir=W [--best] [--data=SOURCE]
[--output=FILE.json] [--config.KEY=VALUE ...]

Restores the newest checkpoint of a training workdir (or, with --best, the one kept in
WORKDIR/best for the best `config.early_stopping.metric`), evaluates it on the run's
eval set or on SOURCE (a `config.data.eval` source string), and prints the numbers as
JSON: eval/loss and eval/perplexity for a language model, eval/loss, eval/accuracy and
eval/f1 for a classifier (every example of SOURCE; a language model uses
`config.eval_batches` batches). `--config.KEY=VALUE` changes the run's config first
(e.g. --config.eval_batches=32).
"""

import json

from absl import flags
from ml_collections import config_flags

from llmjax import cli
from llmjax.config import base_config
from llmjax.training.evaluation import evaluate_workdir

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir written by llmjax.train.")
flags.DEFINE_string("data", "", "Eval source (default: the run's eval set).")
flags.DEFINE_bool("best", False, "The best checkpoint, not the newest.")
flags.DEFINE_string("output", "", "Also write the metrics here as JSON.")
# Overrides of the run's config.json, typed by the config schema (the file comes from
# --workdir, so this flag holds only what the command line changes).
config_flags.DEFINE_config_dict("config", base_config(), "--config.KEY=VALUE: change the run's "
                                "config before evaluating (e.g. --config.eval_batches=32).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; flags only (see --help)")
    if not FLAGS.workdir:
        raise ValueError("give --workdir=DIR, a workdir written by llmjax.train")
    overrides = config_flags.get_override_values(FLAGS["config"])
    results = evaluate_workdir(FLAGS.workdir, data=FLAGS.data, best=FLAGS.best,
                               output=FLAGS.output, overrides=overrides)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    cli.run(main)
