"""torch.compile(fullgraph=True): FCMAE (sparse backend) and the fine-tuning model are one graph each,
and give the eager losses and gradients."""
import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.compat import release
from fcmae import build_fcmae
from finetune_helpers import make_colour_folder
from reliability.faults import finetune_args, finish, start_script
from finetune.model import build_finetune_model
from tests.conftest import randomize_grn, relative_error

pytestmark = pytest.mark.slow  # inductor generates and compiles C++ on the CPU: minutes when not cached


def loss_and_gradients(run, model, loss_fn):
    """loss_fn(run) and the gradients it leaves on ``model``'s parameters (``run``: model or its compiled form)."""
    model.zero_grad()
    loss = loss_fn(run)
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


def assert_compiled_matches_eager(model, loss_fn, backend="inductor"):
    eager_loss, eager_grads = loss_and_gradients(model, model, loss_fn)
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # raises on any graph break
    compiled_loss, compiled_grads = loss_and_gradients(compiled, model, loss_fn)
    assert relative_error(compiled_loss, eager_loss) < 1e-4, f"loss {compiled_loss} vs eager {eager_loss}"
    for name, grad in eager_grads.items():
        err = relative_error(compiled_grads[name], grad)
        assert err < 1e-3, f"compiled gradient of {name} differs from eager by {err:.2e}"


def test_fcmae_with_sparse_backend_compiles_to_one_graph_matching_eager():
    model = build_fcmae("convnextv2_atto", backend="sparse", decoder_dim=64)
    randomize_grn(model)
    images = torch.randn(2, 3, 64, 96)
    visible = model.random_visible_cells(images, torch.Generator().manual_seed(0))
    assert_compiled_matches_eager(model, lambda m: m(images, visible)[0])


def test_fcmae_compiles_to_one_graph_with_a_given_mask_of_another_ratio():
    """A mask made elsewhere (here keeping 3 of 6 cells where the model's ratio keeps 2) is checked
    once, outside the compiled forward; its kept count is a shape, so dynamo traces it (aot_eager:
    the graph is dynamo's business, the kernels are covered above)."""
    from fcmae import mask_from_visible_cells, visible_cells_from_mask

    model = build_fcmae("convnextv2_atto", backend="sparse", decoder_dim=64)
    randomize_grn(model)
    images = torch.randn(2, 3, 64, 96)
    mask = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]])
    visible = visible_cells_from_mask(mask)
    assert_compiled_matches_eager(model, lambda m: m(images, visible)[0], backend="aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(images, visible)[2], mask_from_visible_cells(visible, 6))


@pytest.mark.skipif(release(torch.__version__) < (2, 6), reason="torch < 2.6 breaks the graph at timm's "
                    "checkpoint_seq (activation checkpointing); --compile then runs with a graph break")
def test_finetune_model_compiles_to_one_graph_matching_eager():
    """timm's dense model: dynamo's one graph and AOT autograd's joint graph are what is ours to
    check; its kernels are inductor's (one inductor compile per test run is enough)."""
    model = build_finetune_model("convnextv2_atto", num_classes=10, grad_checkpointing=True)
    randomize_grn(model)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    assert_compiled_matches_eager(model, lambda m: torch.nn.functional.cross_entropy(m(images), labels),
                                  backend="aot_eager")


def test_compile_through_the_runner_on_two_gloo_ranks_with_accumulation_ema_and_checkpoints(tmp_path):
    """``finetune.py --compile`` under torchrun: DDP (no_sync on accumulating micro-batches) inside
    torch.compile, the EMA, mid-epoch and epoch checkpoints; the weights match the eager run's."""
    data = tmp_path / "data"
    make_colour_folder(data / "train", per_class=4, size=24, seed=0)
    make_colour_folder(data / "val", per_class=1, size=24, seed=1)
    states = {}
    for mode in ("eager", "compiled"):
        output = tmp_path / mode
        compile_flag = ["--compile"] if mode == "compiled" else []
        argv = finetune_args(data, output, "--update_freq", "2", "--save_ckpt_steps", "1", *compile_flag, epochs=2)
        run = start_script("finetune.py", argv, tmp_path / f"{mode}.log", torchrun=2)
        finish(run, tmp_path / f"{mode}.log", timeout=900)
        log = (output / "train.log").read_text()
        assert "weights identical on all 2 ranks" in log
        assert log.count("torch.compile: compiling the model (first update): ") == (mode == "compiled")
        states[mode] = load_checkpoint(output / "checkpoint-2.pth")
    assert states["compiled"]["model"].keys() == states["eager"]["model"].keys()  # no wrapper prefixes
    for entry in ("model", "model_ema"):
        for name, tensor in states["eager"][entry].items():
            if tensor.is_floating_point():
                error = relative_error(states["compiled"][entry][name], tensor)
                assert error < 1e-3, f"{entry}.{name}: compiled differs from eager by {error:.2e}"
