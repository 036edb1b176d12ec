"""Run under torchrun (2 processes) by tests/test_trainer_integration.py: a transformers Trainer
(DDP over gloo) trains on a SyntheticDataset of the method in argv[2] (default dfad); each rank
records what it synthesized, the student it ended with, the replay slots it trained on and the
slots its method was handed back (SSD-KD's priority feedback)."""

import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from accelerate_dfkd import SyntheticDataCallback, SyntheticDataset
from accelerate_dfkd.models import build_model

out = Path(sys.argv[1])
torch.manual_seed(0)
teacher = build_model("digits_cnn", num_classes=10, in_channels=1)
with torch.no_grad():
    teacher.train()
    teacher(torch.randn(64, 1, 8, 8))
teacher.eval()
student = build_model("digits_cnn_small", num_classes=10, in_channels=1)
method = sys.argv[2] if len(sys.argv) > 2 else "dfad"
method_kwargs = dict(nz=16, ngf=8, per_device_synthesis_batch_size=16)
if method == "ssd_kd":
    method_kwargs.update(image_mean=[0.3056], image_std=[0.3761], pool_capacity=64, generator_steps=1,
                         warmup_rounds=0)
dataset = SyntheticDataset.from_method(method, teacher, student, image_shape=(1, 8, 8), num_classes=10, batch_size=16,
                                       synthesize_every=2, **method_kwargs)

trained_on, handed_back = [], []  # replay slots: of this rank's batches; given to this rank's method
method_feedback = dataset.synthesizer.after_student_step


def recording_feedback(batch, student_logits, teacher_logits):
    handed_back.append(batch.indices.cpu().clone())
    assert len(batch.images) == len(batch.indices) == len(student_logits) == len(teacher_logits)
    method_feedback(batch, student_logits, teacher_logits)


dataset.synthesizer.after_student_step = recording_feedback


class KDTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["pixel_values"])
        if "replay_indices" in inputs:
            trained_on.append(inputs["replay_indices"].cpu().clone())
        dataset.after_student_step(inputs, logits)
        return F.l1_loss(logits, inputs["teacher_logits"])


args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=6, per_device_train_batch_size=16,
                         learning_rate=1e-2, logging_steps=2, report_to="none", save_strategy="no", use_cpu=True,
                         disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
                         ddp_find_unused_parameters=False)
trainer = KDTrainer(model=student, args=args, train_dataset=dataset, callbacks=[SyntheticDataCallback(dataset)])
trainer.train()
rank = args.process_index
torch.save({"world_size": args.world_size, "rounds": dataset.rounds, "batches_read": dataset.batches_read,
            "batches_per_step": dataset.batches_per_step, "trained_on": trained_on, "handed_back": handed_back,
            "student": {k: v.clone() for k, v in student.state_dict().items()}}, out / f"rank{rank}.pt")

# Leave together, and let the gloo group die now: the Trainer's DDP wrapper holds it, and one left
# for interpreter exit can abort a rank ("terminate called without an active exception").
del trainer
gc.collect()
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
