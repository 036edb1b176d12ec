"""Run under torchrun with 2 processes: each rank scores its slice of a fixed segmentation problem with
evaluate_miou and writes what it got to OUTPUT/miou_rank<r>.json. argv: OUTPUT."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `tests`

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch import nn  # noqa: E402

from accelerate_dfkd.evaluation import evaluate_miou  # noqa: E402
from tests.test_segmentation import fixed_segmentation_problem  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)
acc = Accelerator(cpu=True)
data = fixed_segmentation_problem()
miou = evaluate_miou(nn.Identity(), data, num_classes=5, batch_size=2, process_index=acc.process_index,
                     num_processes=acc.num_processes)
(out / f"miou_rank{acc.process_index}.json").write_text(json.dumps(
    {"miou": miou, "world_size": acc.num_processes, "slice": len(data.labels[acc.process_index::acc.num_processes])}))

# Leave together: a rank that exits while the other is still inside a gloo collective can abort
# ("terminate called without an active exception").
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
