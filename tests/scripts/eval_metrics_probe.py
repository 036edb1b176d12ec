"""Run under torchrun with 2 processes: each rank scores its slice of a fixed problem with
evaluate_classifier (top-1/top-5, a torchmetrics F1 and, if installed, a local `evaluate` script)
and writes what it got to OUTPUT/scores_rank<r>.json. argv: OUTPUT METRIC_SCRIPT."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `tests`

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torchmetrics.classification import MulticlassF1Score  # noqa: E402

from accelerate_dfkd.evaluation import evaluate_classifier  # noqa: E402
from tests.test_eval_datasets import fixed_problem  # noqa: E402

out, script = Path(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
acc = Accelerator(cpu=True)
metrics = {"f1": MulticlassF1Score(num_classes=10, average="macro")}
try:
    import evaluate

    # a cache folder per rank: evaluate's own files never collide; EvaluateMetric gathers to rank 0
    metrics["acc"] = evaluate.load(script, cache_dir=str(out / f"cache{acc.process_index}"))
except ImportError:
    pass
model, data, _, _ = fixed_problem(n=101)
scores = evaluate_classifier(model, data, num_classes=10, process_index=acc.process_index,
                             num_processes=acc.num_processes, batch_size=16, metrics=metrics)
scores.update(world_size=acc.num_processes, slice=len(data.labels[acc.process_index::acc.num_processes]))
(out / f"scores_rank{acc.process_index}.json").write_text(json.dumps(scores))
# Leave together: a rank that exits while the other is still inside a gloo collective can abort
# ("terminate called without an active exception").
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
