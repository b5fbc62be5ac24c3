"""``ForceField.enable_compile`` (``torch.compile``, the launcher's ``--compile``): compiled equals eager.

For every architecture where compile is offered and both force modes: energies and forces equal to
eager within fp32 round-off in evaluation, and in a training step the forces and every parameter
gradient too (conservative forces: the compiled program takes the energy gradient with
``torch.func.grad``, so the loss's backward is first order). Compiled with ``fullgraph=True``: a
graph break is an error here. The default lane compiles the smallest conservative MPNN with ``aot_eager``
(dynamo's capture and AOTAutograd, as inductor sees them, without code generation); the other
architectures are ``slow`` (dynamo's capture takes tens of seconds each on a loaded 2-core
machine), inductor runs only with ``SYMSCALE_TEST_INDUCTOR=1`` (it compiles C++: minutes on CPU).
Speed is measured in ``benchmarks/bench_compile.py``, not here.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from ase.build import molecule

from datapipe import keys
from datapipe.graph import batch_from_atoms
from zoo.registry import MODELS, build
from zoo.testing import assert_close_scaled, perturbed

INDUCTOR = pytest.mark.skipif(os.environ.get("SYMSCALE_TEST_INDUCTOR") != "1",
                              reason="set SYMSCALE_TEST_INDUCTOR=1 to compile with inductor (minutes on CPU)")
#: the smallest models of each architecture that still run every code path (one layer)
SMALL = {"mpnn": (8, {"num_layers": 1}), "mc-egnn": (8, {"num_layers": 1}), "esen": (8, {"num_layers": 1})}


def compare_compiled(arch: str, direct: bool, backend: str) -> None:
    """Eager and compiled copies (same weights) on one batch of two molecules: evaluation, then a
    training step with the loss's parameter gradients."""
    width, overrides = SMALL[arch]
    torch.manual_seed(0)
    eager = build(arch, width, direct_forces=direct, **overrides)
    compiled = copy.deepcopy(eager).enable_compile(backend=backend, fullgraph=True)
    assert compiled.compiled and not eager.compiled
    batch = batch_from_atoms([perturbed(molecule("CH3CH2OH"), 1), perturbed(molecule("C6H6"), 2)])

    outputs = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        model.eval()
        with torch.enable_grad() if not direct else torch.no_grad():
            out = model(batch)
        outputs[name] = {k: v.detach() for k, v in out.items()}
    assert bool(outputs["compiled"][keys.FORCES].abs().max() > 0)  # not silent zero forces
    for key in (keys.ENERGY, keys.FORCES):
        assert_close_scaled(outputs["compiled"][key], outputs["eager"][key], rtol=1e-5, what=f"{arch} eval {key}")

    grads = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        model.train()
        out = model(batch)
        (out[keys.ENERGY].abs().mean() + out[keys.FORCES].norm(dim=-1).mean()).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads[name + " forces"] = out[keys.FORCES].detach()
    assert_close_scaled(grads["compiled forces"], grads["eager forces"], rtol=1e-5, what=f"{arch} training forces")
    assert grads["compiled"].keys() == grads["eager"].keys() and grads["eager"]
    for name, g in grads["eager"].items():
        assert_close_scaled(grads["compiled"][name], g, rtol=1e-4, what=f"{arch} gradient of {name}")


def test_compiled_conservative_mpnn_equals_eager():
    """The default lane's case: conservative forces (the gradient inside the compiled program)."""
    compare_compiled("mpnn", False, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
@pytest.mark.parametrize("arch", sorted(SMALL))
def test_compiled_equals_eager(arch, direct):
    if arch == "mpnn" and not direct:
        pytest.skip("the default lane's case (test_compiled_conservative_mpnn_equals_eager)")
    compare_compiled(arch, direct, "aot_eager")


@pytest.mark.slow
@INDUCTOR
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
@pytest.mark.parametrize("arch", sorted(SMALL))
def test_inductor_equals_eager(arch, direct):
    compare_compiled(arch, direct, "inductor")


def test_every_architecture_is_tested_or_refused():
    """A new architecture either joins the compiled-equals-eager tests or says why it is refused."""
    for name, spec in MODELS.items():
        assert (name in SMALL) != (spec.model_class.compile_refusal is not None), name


def test_refusals_are_clear_messages():
    """An architecture that does not compile refuses with its reason, in the model and at the
    launcher's argument parsing (before any data is read)."""
    from launcher.config import parse

    refused = [name for name, spec in MODELS.items() if spec.model_class.compile_refusal is not None]
    assert refused  # GemNet-OC today: graph construction inside the forward
    for name in refused:
        model = build(name, 8)
        with pytest.raises(RuntimeError, match="torch.compile is not offered .*graph breaks"):
            model.enable_compile()
        assert not model.compiled
        with pytest.raises(SystemExit) as exit_info:
            parse(["--model", name, "--compile"])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        parse(["--model", "mpnn", "--compile", "--engine", "fsdp"])
    for conservative in ([], ["--conservative"]):  # both force modes are offered
        assert parse(["--model", "mpnn", "--compile", *conservative]).compile


def test_refusal_message_text(capsys):
    from launcher.config import parse

    name = next(n for n, s in MODELS.items() if s.model_class.compile_refusal is not None)
    with pytest.raises(SystemExit):
        parse(["--model", name, "--compile"])
    err = capsys.readouterr().err
    assert f"--compile is not offered for --model {name}" in err and "drop --compile" in err
