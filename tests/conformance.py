"""The contract every Synthesizer passes. A method's test file subclasses `SynthesizerConformance`
and provides `make_synthesizer(teacher, **method_overrides)` and `loss_terms` (the weights that
switch each synthesis loss term on or off)."""

from __future__ import annotations

import copy

import torch

from accelerate_dfkd.synthesis import SynthesisContext, Synthesizer

from .conftest import tiny_student, tiny_teacher


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SynthesizerConformance:
    # name of the config field -> it weights one synthesis loss term; each must reach the generator
    loss_terms: dict[str, float] = {}
    image_shape = (1, 8, 8)
    # overrides under which a student identical to the teacher really computes the same function
    equal_student_overrides: dict = {}

    def make_synthesizer(self, teacher: torch.nn.Module, seed: int = 0, **overrides) -> Synthesizer:
        raise NotImplementedError

    def trained_parameters(self, synth: Synthesizer) -> list[torch.nn.Parameter]:
        return [p for m in synth.modules().values() for p in m.parameters()]

    # -----------------------------------------------------------------------------------------
    def test_images_have_teacher_input_shape_and_are_finite(self):
        synth = self.make_synthesizer(tiny_teacher())
        out = synth.synthesize(tiny_student())
        batch = next(iter(synth.build_source(4)))
        assert batch.images.shape == (4, *self.image_shape)
        assert torch.isfinite(batch.images).all()
        assert out.images is not None and torch.isfinite(out.images).all()
        assert all(torch.isfinite(v) for v in out.losses.values())

    def test_synthesize_trains_itself_and_leaves_teacher_and_student_untouched(self):
        teacher, student = tiny_teacher(), tiny_student()
        student.train()
        for p in student.parameters():  # a pending student gradient must survive synthesis
            p.grad = torch.ones_like(p)
        synth = self.make_synthesizer(teacher)
        before_own = [p.detach().clone() for p in self.trained_parameters(synth)]
        before_teacher, before_student = _snapshot(teacher), [p.detach().clone() for p in student.parameters()]
        synth.synthesize(student)
        assert _equal(before_teacher, _snapshot(teacher)), "synthesis changed the teacher"
        assert all(torch.equal(a, p) for a, p in zip(before_student, student.parameters())), "student weights changed"
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in student.parameters()), "student grads changed"
        assert all(p.requires_grad for p in student.parameters()), "student left frozen"
        assert not all(torch.equal(a, p) for a, p in zip(before_own, self.trained_parameters(synth))), \
            "synthesize() did not update its own parameters"
        assert not teacher.training, "teacher left in train mode"

    def test_no_hooks_left_behind(self):
        teacher, student = tiny_teacher(), tiny_student()
        synth = self.make_synthesizer(teacher)
        synth.synthesize(student)
        for model in (teacher, student):
            for m in model.modules():
                assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks

    def test_each_loss_term_reaches_the_generator(self):
        """Switched on alone, every term gives the synthesis parameters a non-zero gradient.
        This catches the reference bug that passes the teacher as the student (a zero term)."""
        for term in self.loss_terms:
            off = {other: 0.0 for other in self.loss_terms if other != term}
            synth = self.make_synthesizer(tiny_teacher(), **off)
            grads = self._gradients_after_one_round(synth, tiny_student())
            assert grads > 0, f"{term} alone gives no gradient to the synthesis parameters"

    def test_adversarial_term_vanishes_when_student_equals_teacher(self):
        """The check above can fail: with the teacher as its own student the discrepancy is 0."""
        if "adversarial_weight" not in self.loss_terms:
            return
        teacher = tiny_teacher()
        off = {other: 0.0 for other in self.loss_terms if other != "adversarial_weight"}
        synth = self.make_synthesizer(teacher, **off, **self.equal_student_overrides)
        assert self._gradients_after_one_round(synth, copy.deepcopy(teacher)) == 0

    def _gradients_after_one_round(self, synth: Synthesizer, student: torch.nn.Module) -> float:
        params = self.trained_parameters(synth)
        synth.synthesize(student)
        return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)

    def test_same_seed_same_images(self):
        a = self.make_synthesizer(tiny_teacher(), seed=3)
        b = self.make_synthesizer(tiny_teacher(), seed=3)
        a.synthesize(tiny_student()), b.synthesize(tiny_student())
        assert torch.equal(next(iter(a.build_source(4))).images, next(iter(b.build_source(4))).images)
        c = self.make_synthesizer(tiny_teacher(), seed=4)
        c.synthesize(tiny_student())
        assert not torch.equal(next(iter(a.build_source(4))).images, next(iter(c.build_source(4))).images)

    def test_state_dict_round_trip_reproduces_the_next_round_and_batch(self):
        student = tiny_student()
        a = self.make_synthesizer(tiny_teacher(), seed=5)
        a.synthesize(student)
        state = copy.deepcopy(a.state_dict())
        b = self.make_synthesizer(tiny_teacher(), seed=99)  # different stream until restored
        b.load_state_dict(state)
        out_a, out_b = a.synthesize(copy.deepcopy(student)), b.synthesize(copy.deepcopy(student))
        assert torch.equal(out_a.images, out_b.images)
        for pa, pb in zip(self.trained_parameters(a), self.trained_parameters(b)):
            assert torch.equal(pa, pb)
        src_a, src_b = a.build_source(4), b.build_source(4)
        src_b.load_state_dict(copy.deepcopy(src_a.state_dict()))
        assert torch.equal(src_a.next_batch().images, src_b.next_batch().images)

    def test_context_gives_each_rank_its_own_stream(self):
        r0 = SynthesisContext(seed=0, process_index=0, num_processes=2).make_rng()
        r1 = SynthesisContext(seed=0, process_index=1, num_processes=2).make_rng()
        assert not torch.equal(torch.randn(4, generator=r0), torch.randn(4, generator=r1))
