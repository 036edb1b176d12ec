"""Run under a 2-process launch by tests/test_multiprocess.py: a short DFAD run through the Python
API, recording what each rank synthesized and the student and generator it ended with."""

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from accelerate_dfkd import Callback, Distiller
from accelerate_dfkd.config import DistillConfig
from accelerate_dfkd.methods.dfad import DFADConfig
from accelerate_dfkd.models import build_model

out = Path(sys.argv[1])
torch.manual_seed(0)
teacher = build_model("digits_cnn", num_classes=10, in_channels=1)
with torch.no_grad():
    teacher.train()
    teacher(torch.randn(64, 1, 8, 8))
teacher.eval()
student = build_model("digits_cnn_small", num_classes=10, in_channels=1)

first_images = {}


class RecordImages(Callback):
    def on_synthesis_end(self, state, output):
        first_images.setdefault("synthesis", output.images.clone())


config = DistillConfig(output_dir=str(out / "run"), max_steps=6, per_device_train_batch_size=16, eval_steps=0,
                       save_steps=3, report_to="none", progress_bar=False, teacher_checkpoint="python",
                       eval_dataset="none")
method = DFADConfig(nz=16, ngf=8, per_device_synthesis_batch_size=16, student_steps_per_round=2)
distiller = Distiller(config, method, teacher=teacher, student=student, callbacks=[RecordImages()])
batch = distiller.source.next_batch().images.clone()  # this rank's first student batch
distiller.source.load_state_dict({"rng": distiller.synthesizer.context.make_rng(stream=1).get_state()})
results = distiller.train()
rank = distiller.accelerator.process_index
torch.save({"synthesis": first_images["synthesis"], "batch": batch,
            "student": distiller.accelerator.unwrap_model(distiller.student).state_dict(),
            "generator": distiller.synthesizer.generator.state_dict(),
            "world_size": results["world_size"],
            # The end of train() must leave no DDP wrapper (it keeps the gloo group alive until
            # interpreter exit, where tearing it down aborted a rank now and then) and no group.
            "live_ddp": sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()),
            "process_group_alive": dist.is_initialized()}, out / f"rank{rank}.pt")
