"""The study's two models end to end and at fault (the counts, shapes and freezing the notebooks 10/11 assert are not repeated here):
full-size models at odd sizes, the pretrained path offline, freezing,
batch-size-1 trap, bf16 autocast and channels_last, and counted FLOPs (sun_seg.models, GitHub issue 3)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import UperNetForSemanticSegmentation

from sun_seg.core import CLASS_NAMES, IGNORE_INDEX, DataError, ParameterError, normalize_images
from train_fixtures import write_published_checkpoint
from sun_seg.models import (UPERNET_CHECKPOINT, UNet, UperNetSegmenter, build_model, build_upernet,
                            flop_breakdown, model_profile, upernet_config)
from sun_seg.testing import STUDY_TRAINABLE_PARAMS

# a tiny UPerNet (as transformers' own tests build them): same code paths, milliseconds per step
TINY = dict(backbone_config=dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]), hidden_size=16, auxiliary_channels=8)
STUDY_TRAINABLE = {k: v for k, v in STUDY_TRAINABLE_PARAMS.items() if k != "unet"}  # the study's Table III
CLASSIFIERS = ("decode_head.classifier", "auxiliary_head.classifier")


def n_params(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


@pytest.fixture(scope="module")
def full_upernet():
    """The study's UPerNet-ConvNeXt-T architecture with random weights (built once: ~1 s)."""
    return build_upernet(None, finetune="encoder+decoder")


def batchnorm_stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def train_step(model, size=(35, 45), batch=2, steps=1):
    """What the training engine does: optimizer over trainable parameters, main + weighted auxiliary loss."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        x, y = torch.randn(batch, 3, *size), torch.randint(0, 37, (batch, *size))
        out = model(x, with_aux=True)
        logits, aux = out if model.has_aux else (out, None)
        loss = F.cross_entropy(logits, y)
        if aux is not None: loss = loss + model.aux_loss_weight * F.cross_entropy(aux, y)
        loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- fine-tuning depth
def test_build_upernet_applies_finetune():
    model = build_upernet(None, finetune="classifier")
    assert model.finetune == "classifier"
    trainable = {n for n, p in model.net.named_parameters() if p.requires_grad}
    assert trainable == {f"{c}.{w}" for c in CLASSIFIERS for w in ("weight", "bias")}
    assert n_params(model, trainable=True) == STUDY_TRAINABLE["classifier"]


def test_upernet_config_matches_the_checkpoint_architecture():
    config = upernet_config()
    backbone = config.backbone_config
    assert (backbone.hidden_sizes, backbone.depths) == ([96, 192, 384, 768], [3, 3, 9, 3])
    assert (backbone.drop_path_rate, backbone.layer_norm_eps, backbone.layer_scale_init_value) == (0.0, 1e-12, 1e-6)
    assert backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]
    assert (config.hidden_size, list(config.pool_scales), config.auxiliary_in_channels, config.auxiliary_channels) == (512, [1, 2, 3, 6], 384, 256)
    assert (config.use_auxiliary_head, config.auxiliary_loss_weight, config.auxiliary_num_convs) == (True, 0.4, 1)
    assert config.loss_ignore_index == IGNORE_INDEX
    assert [config.id2label[i] for i in range(37)] == list(CLASS_NAMES)
    assert config.label2id["bag"] == 36


# ---------------------------------------------------------------- shapes at odd sizes
def test_full_unet_on_an_odd_size():
    with torch.no_grad():
        assert UNet().eval()(torch.randn(1, 3, 67, 91)).shape == (1, 37, 67, 91)


def test_full_upernet_on_an_odd_size(full_upernet):
    with torch.no_grad():
        assert full_upernet.eval()(torch.randn(1, 3, 67, 91)).shape == (1, 37, 67, 91)


@pytest.mark.parametrize("model", ["unet", "upernet"])
def test_models_refuse_unnormalised_or_too_small_images(model):
    net = UNet(base_channels=4) if model == "unet" else build_upernet(None, **TINY)
    with pytest.raises(ParameterError, match="normalize_images"):
        net(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(ParameterError, match="image_size"):
        net(torch.randn(2, 3, net.min_side - 1, 64))
    with pytest.raises(ParameterError, match="3-channel"):
        net(torch.randn(2, 4, 64, 64))


# ---------------------------------------------------------------- the pretrained path, offline
@pytest.fixture(scope="module")
def ade_checkpoint(tmp_path_factory):
    """A small 150-class UperNet saved with save_pretrained: stands in for the ADE20K checkpoint."""
    torch.manual_seed(1)
    net = UperNetForSemanticSegmentation(upernet_config(150, **TINY))
    folder = tmp_path_factory.mktemp("ade-upernet")
    net.save_pretrained(folder)
    return folder, net


def test_pretrained_folder_keeps_weights_and_replaces_heads(ade_checkpoint):
    folder, ade = ade_checkpoint
    torch.manual_seed(2)
    model = build_upernet(folder, finetune="decoder")
    assert model.source == str(folder)
    ade_state, state = ade.state_dict(), model.net.state_dict()
    assert sorted(ade_state) == sorted(state)
    backbone = [k for k in state if k.startswith("backbone.")]
    assert backbone and all(torch.equal(state[k], ade_state[k]) for k in backbone)
    kept = [k for k in state if not k.startswith(CLASSIFIERS)]
    assert all(torch.equal(state[k], ade_state[k]) for k in kept)  # every other weight, BatchNorm statistics included
    for head, width in zip(CLASSIFIERS, (16, 8)):
        weight, bias = state[f"{head}.weight"], state[f"{head}.bias"]
        assert weight.shape == (37, width, 1, 1) and bias.shape == (37,)
        assert not torch.equal(weight, ade_state[f"{head}.weight"][:37])  # re-initialised, not sliced
        assert 0.01 < weight.std().item() < 0.04 and torch.all(bias == 0)  # transformers' init: N(0, 0.02), zero bias
    assert (model.config.num_labels, model.config.loss_ignore_index) == (37, IGNORE_INDEX)
    assert model.config.id2label[0] == "wall" and model.num_classes == 37
    assert n_params(model, trainable=True) == n_params(model.net.decode_head) + n_params(model.net.auxiliary_head)


def test_pretrained_with_matching_classes_keeps_heads(tmp_path):
    model = build_upernet(None, finetune="encoder+decoder", **TINY)
    model.net.save_pretrained(tmp_path)
    again = build_upernet(tmp_path, finetune="classifier")
    assert model.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_incomplete_checkpoint_is_refused(ade_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    folder, _ = ade_checkpoint
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if "fpn_bottleneck" not in k}, tmp_path / "model.safetensors")
    with pytest.raises(DataError, match="lacks .* weights"):
        build_upernet(tmp_path)


def test_hub_id_without_network_says_how_to_get_weights(tmp_path):
    with pytest.raises(ParameterError) as err:
        build_upernet(UPERNET_CHECKPOINT, local_files_only=True, cache_dir=tmp_path)
    message = str(err.value)
    assert "parameter `pretrained`" in message
    assert f"hf download {UPERNET_CHECKPOINT}" in message and "--local-dir" in message and "pretrained=None" in message


def test_bad_pretrained_values(tmp_path):
    with pytest.raises(ParameterError, match="no folder"):
        build_upernet(str(tmp_path / "missing" / "weights"))
    with pytest.raises(DataError, match="no config.json"):
        build_upernet(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ParameterError, match="is a file"):
        build_upernet(tmp_path / "model.safetensors")
    with pytest.raises(ParameterError, match="architecture of a pretrained model"):
        build_upernet(UPERNET_CHECKPOINT, backbone_config=dict(hidden_sizes=[8, 16, 32, 64]))
    with pytest.raises(ParameterError, match="finetune"):
        build_upernet(None, finetune="everything")
    with pytest.raises(ParameterError, match="hiden_size"):
        build_upernet(None, hiden_size=16)


# ---------------------------------------------------------------- freezing really freezes
def test_frozen_batchnorm_stays_in_eval_mode_after_train():
    model = build_upernet(None, finetune="classifier", **TINY)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    assert model.training and bns and not any(m.training for m in bns)
    assert model.net.decode_head.classifier.training
    model.set_finetune("decoder")  # unfrozen again: back to training mode
    assert all(m.training for m in bns)
    model.eval()
    assert not any(m.training for m in model.modules())


# ---------------------------------------------------------------- batch size 1 in training
def test_batch_of_one_in_training_is_refused_clearly():
    model = build_upernet(None, finetune="decoder", **TINY).train()
    with pytest.raises(ParameterError, match="parameter `batch_size`.*at least 2 images"):
        model(torch.randn(1, 3, 64, 64), with_aux=True)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 37, 64, 64)
    model.set_finetune("classifier").train()  # frozen BatchNorm: one image works
    logits, aux = model(torch.randn(1, 3, 64, 64), with_aux=True)
    assert logits.shape == aux.shape == (1, 37, 64, 64)


# ---------------------------------------------------------------- bf16 autocast and channels_last
@pytest.mark.parametrize("name", ["unet", "upernet"])
def test_bf16_autocast_and_channels_last(name):
    torch.manual_seed(0)
    model = UNet(base_channels=8) if name == "unet" else build_upernet(None, finetune="encoder+decoder", **TINY)
    x = normalize_images(torch.randint(0, 256, (2, 3, 67, 91), dtype=torch.uint8))
    model.eval()
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        last = model(x_cl)
    assert low.dtype == torch.bfloat16 and low.shape == reference.shape == (2, 37, 67, 91)
    scale = reference.abs().max()
    assert (low.float() - reference).abs().max() <= 0.05 * scale
    torch.testing.assert_close(last, reference, rtol=1e-4, atol=1e-4 * scale)
    # and a training step in both at once
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_cl, with_aux=True)
    loss = sum(o.float().mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- build_model
def test_build_model_dispatches_and_checks_options():
    assert isinstance(build_model("unet", base_channels=4), UNet)
    model = build_model("upernet", pretrained=None, finetune="classifier", **TINY)
    assert isinstance(model, UperNetSegmenter) and model.finetune == "classifier"
    assert build_model("unet", num_classes=5, base_channels=4).num_classes == 5
    assert build_model("upernet", num_classes=5, pretrained=None, **TINY).num_classes == 5
    with pytest.raises(ParameterError, match="model"):
        build_model("segformer")
    with pytest.raises(ParameterError, match="finetune"):
        build_model("unet", finetune="decoder")
    with pytest.raises(ParameterError, match="width"):
        build_model("unet", width=8)


# ---------------------------------------------------------------- counted FLOPs
def test_unet_profile_matches_reference_figures():
    profile = model_profile(UNet(), image_size=(256, 256))
    assert (profile["total_params"], profile["trainable_params"]) == (31_039_973, 31_039_973)
    assert profile["flops_per_image"] == pytest.approx(96.6e9, rel=0.005)  # performance.md
    assert profile["train_flops_per_image"] == pytest.approx(3 * profile["flops_per_image"], rel=0.01)


def test_upernet_profile_matches_reference_figures(full_upernet):
    full_upernet.set_finetune("encoder+decoder")
    profile = model_profile(full_upernet, image_size=(512, 512))
    assert profile["total_params"] == profile["trainable_params"] == 60_155_626
    # performance.md: 469 GFLOP with transformers' forward, which also runs the auxiliary head (1.8 GFLOP)
    assert profile["flops_per_image"] == pytest.approx(467.4e9, rel=0.002)
    split = flop_breakdown(full_upernet, (512, 512), depth=2)
    assert split[""] == profile["flops_per_image"]
    assert split["net.decode_head"] / split[""] == pytest.approx(0.90, abs=0.02)
    assert profile["train_flops_per_image"] == pytest.approx(3 * profile["flops_per_image"], rel=0.02)
    classifier = model_profile(full_upernet.set_finetune("classifier"), (512, 512))
    assert classifier["trainable_params"] == 28_490
    assert classifier["flops_per_image"] == profile["flops_per_image"]
    assert classifier["train_flops_per_image"] < 1.01 * profile["flops_per_image"]  # no backward through frozen parts
    full_upernet.set_finetune("encoder+decoder")


def test_profile_counts_grouped_convolution_backward_correctly():
    conv = nn.Conv2d(16, 16, 7, padding=3, groups=16)
    profile = model_profile(conv, 20, in_channels=16)
    assert profile["flops_per_image"] == 2 * 16 * 49 * 20 * 20
    assert profile["train_flops_per_image"] == 2 * profile["flops_per_image"]  # forward + weight gradient


def test_profile_leaves_the_model_untouched():
    model = build_upernet(None, finetune="decoder", **TINY).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    profile = model_profile(model, (67, 91), batch_size=1)
    assert profile["flops_per_image"] > 0 and profile["train_flops_per_image"] > 2 * profile["flops_per_image"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())
    with pytest.raises(ParameterError, match="image_size"):
        model_profile(model, (0, 10))


# ---------------------------------------------------------------- the full-size models take a real step (a few seconds)
@pytest.mark.parametrize("finetune", ["classifier", "decoder"])
def test_full_upernet_training_step_freezes(finetune):
    model = build_upernet(None, finetune=finetune).to(memory_format=torch.channels_last)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    stats = batchnorm_stats(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_step(model, size=(67, 91))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    if finetune == "classifier":
        assert all(torch.equal(v, stats[k]) for k, v in batchnorm_stats(model).items())


def test_full_unet_training_step_bf16_channels_last():
    model = UNet().to(memory_format=torch.channels_last)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_step(model, size=(67, 91))
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------------------------------------------------
# The published checkpoint as published: openmmlab/upernet-convnext-tiny was written in 2023 by transformers 4.26,
# its config.json carries that era's fields and its weights may exist only as a pickled pytorch_model.bin.

def test_published_checkpoint_as_published_loads_every_tensor_but_the_classifiers(tmp_path):
    """The 2023 folder through the engine's `pretrained` path: every tensor but the two classifiers exactly, and the
    classifiers 37-way (GitHub issue 10)."""
    from sun_seg.train import TrainConfig, build_run_model
    folder = tmp_path / "upernet-convnext-tiny"
    published = write_published_checkpoint(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]  # no safetensors
    model = build_run_model(TrainConfig(model="upernet", pretrained=str(folder)).validate())
    loaded = model.net.state_dict()
    assert set(loaded) == set(published)
    heads = {f"{c}.{w}" for c in CLASSIFIERS for w in ("weight", "bias")}
    for name, tensor in published.items():
        if name in heads:
            assert loaded[name].shape[0] == 37, name
        else:
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert model.num_classes == 37 and model.config.id2label[36] == CLASS_NAMES[36]
    assert model.config.loss_ignore_index == IGNORE_INDEX
    assert model.finetune == "decoder"


def test_pinned_commit_must_be_the_folders(tmp_path):
    """A folder from `hf download --local-dir` names its commit; a `pretrained_revision` pinning another is refused."""
    folder = tmp_path / "upernet-convnext-tiny"
    write_published_checkpoint(folder)
    meta = folder / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text("a" * 40 + "\netag\n1.0\n")
    with pytest.raises(ParameterError, match="parameter `pretrained_revision`"):
        build_upernet(folder, revision="b" * 40)
    assert build_upernet(folder, revision="a" * 40).num_classes == 37


def test_cached_flops_are_never_read_back_for_other_code(tmp_path, monkeypatch):
    """A run's FLOP count is cached (`cached_model_profile`, issue 13); an edit of any source file beside the model's
    class, or another size or trainable set, makes another key, and an edited cache file is counted again."""
    import importlib, sys
    from sun_seg.models.profile import cached_model_profile, profile_key
    package = tmp_path / "flopmodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("WIDTH = 4\n")
    (package / "net.py").write_text("from torch import nn\nfrom .helpers import WIDTH\n"
                                    "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                                    "        self.conv = nn.Conv2d(3, WIDTH, 3, padding=1)\n"
                                    "    def forward(self, x): return self.conv(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = importlib.import_module("flopmodels.net").Net()
    key = profile_key(net, 16)
    first = cached_model_profile(net, 16, tmp_path / "cache")
    assert first == model_profile(net, 16) and (tmp_path / "cache" / f"{key}.json").is_file()
    assert cached_model_profile(net, 16, tmp_path / "cache") == first  # read back
    cached = tmp_path / "cache" / f"{key}.json"
    cached.write_text(cached.read_text().replace(str(first["flops_per_image"]), "1"))  # edited by hand
    assert cached_model_profile(net, 16, tmp_path / "cache") == first  # not believed: counted again
    (package / "helpers.py").write_text("WIDTH = 4  # edited\n")  # a helper beside the class, not the class's file
    assert profile_key(net, 16) != key
    assert profile_key(net, 32) != profile_key(net, 16)
    net.conv.bias.requires_grad_(False)
    assert profile_key(net, (16, 16)) != profile_key(importlib.import_module("flopmodels.net").Net(), (16, 16))
    sys.modules.pop("flopmodels.net"); sys.modules.pop("flopmodels.helpers"); sys.modules.pop("flopmodels")


def test_a_unet_run_never_imports_transformers():
    """transformers is imported where a UPerNet is built or loaded (about 2 s of every U-Net run's start otherwise, issue
    13); the run still records its version (from the package's metadata)."""
    import subprocess, sys
    code = ("import sys, torch\nfrom sun_seg.train import TrainConfig, build_run_model, plan_run, fit, LivePlot\n"
            "from sun_seg.train.checkpoint import environment_info\n"
            "build_run_model(TrainConfig(model='unet', unet_width=4)); env = environment_info(torch.device('cpu'))\n"
            "assert 'transformers' not in sys.modules, 'imported'\n"
            "import transformers; assert env['transformers'] == transformers.__version__, env['transformers']\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
