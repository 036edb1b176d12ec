"""Run under a 2-process launch by tests/test_pre_dfkd.py: a short PRE-DFKD run through the Python
API, recording each rank's memory latents and the student, novel generator and VAE it ended with."""

import sys
from pathlib import Path

import torch

from accelerate_dfkd import Distiller
from accelerate_dfkd.config import DistillConfig
from accelerate_dfkd.methods.pre_dfkd import PreDFKDConfig
from accelerate_dfkd.models import build_model

out = Path(sys.argv[1])
torch.manual_seed(0)
teacher = build_model("digits_cnn", num_classes=10, in_channels=1)
with torch.no_grad():
    teacher.train()
    teacher(torch.randn(64, 1, 8, 8))
teacher.eval()
student = build_model("digits_cnn_small", num_classes=10, in_channels=1)

config = DistillConfig(method="pre_dfkd", output_dir=str(out / "run"), max_steps=6, per_device_train_batch_size=18,
                       eval_steps=0, save_steps=3, report_to="none", progress_bar=False, teacher_checkpoint="python",
                       eval_dataset="none")
method = PreDFKDConfig(nz=16, ngf=8, nef=8, per_device_synthesis_batch_size=16, student_steps_per_round=3,
                       vae_steps_per_round=2)
distiller = Distiller(config, method, teacher=teacher, student=student)
results = distiller.train()
synth = distiller.synthesizer
rank = distiller.accelerator.process_index
torch.save({"student": distiller.accelerator.unwrap_model(distiller.student).state_dict(),
            "novel_generator": synth.novel_generator.state_dict(), "vae": synth.vae.state_dict(),
            "memory_latents": synth.memory_latents.value.clone(), "replay_state_bytes": synth.replay_state_bytes(),
            "world_size": results["world_size"], "rounds": results["synthesis_rounds"]}, out / f"rank{rank}.pt")
