"""Small generated data and tiny training parameters shared by the training tests (not a test module)."""
from pathlib import Path

import numpy as np

from sun_seg.testing import tiny_frames as _frames, tiny_params, write_tiny_release  # noqa: F401 (shared with notebooks)
from sun_seg.train import Callback


def param_pairs(params: dict) -> list[str]:
    """`-p name value` command-line pairs (papermill's and `sun-seg train`'s form) of a parameter dict."""
    return [x for k, v in params.items() for x in ("-p", k, str(v))]


def weights_of(path) -> dict:
    """The tensors of a safetensors checkpoint."""
    from safetensors.torch import load_file
    return load_file(str(path))


class InterruptAt(Callback):
    """Raise KeyboardInterrupt (as Ctrl-C would) after a given optimizer step of a given epoch."""
    def __init__(self, epoch, step): self.epoch, self.step = epoch, step
    def after_step(self, trainer, epoch, step):
        if (epoch, step) == (self.epoch, self.step): raise KeyboardInterrupt


def _legacy_backbone(hidden_sizes, depths) -> dict:
    """The ConvNeXt backbone_config as transformers 4.26 wrote it (every PretrainedConfig field of the time)."""
    return {"_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
            "begin_suppress_tokens": None, "bos_token_id": None, "chunk_size_feed_forward": 0,
            "cross_attention_hidden_size": None, "decoder_start_token_id": None, "depths": depths,
            "diversity_penalty": 0.0, "do_sample": False, "drop_path_rate": 0.0, "early_stopping": False,
            "encoder_no_repeat_ngram_size": 0, "eos_token_id": None, "exponential_decay_length_penalty": None,
            "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "hidden_act": "gelu",
            "hidden_sizes": hidden_sizes, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "image_size": 224,
            "initializer_range": 0.02, "is_decoder": False, "is_encoder_decoder": False,
            "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "layer_norm_eps": 1e-12, "layer_scale_init_value": 1e-06,
            "length_penalty": 1.0, "max_length": 20, "min_length": 0, "model_type": "convnext",
            "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_channels": 3,
            "num_return_sequences": 1, "num_stages": 4, "out_features": ["stage1", "stage2", "stage3", "stage4"],
            "output_attentions": False, "output_hidden_states": False, "output_scores": False, "pad_token_id": None,
            "patch_size": 4, "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
            "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
            "stage_names": ["stem", "stage1", "stage2", "stage3", "stage4"], "suppress_tokens": None,
            "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
            "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None,
            "torchscript": False, "transformers_version": "4.26.0.dev0", "typical_p": 1.0, "use_bfloat16": False}


def write_published_checkpoint(folder, hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 1, 1), hidden_size=16,
                               auxiliary_channels=8, seed=0) -> dict:
    """A folder like openmmlab/upernet-convnext-tiny (2023): a 4.26-era config.json, 150 ADE20K labels, weights only as
    a pickled pytorch_model.bin (seeded random values; the architecture narrowed for speed). Returns the tensors."""
    import json
    import torch
    from transformers import UperNetConfig, UperNetForSemanticSegmentation
    folder.mkdir(parents=True, exist_ok=True)
    labels = {str(i): f"ade20k_{i}" for i in range(150)}
    config = {"architectures": ["UperNetForSemanticSegmentation"], "auxiliary_channels": auxiliary_channels,
              "auxiliary_concat_input": False, "auxiliary_in_channels": hidden_sizes[2], "auxiliary_loss_weight": 0.4,
              "auxiliary_num_convs": 1, "backbone_config": _legacy_backbone(list(hidden_sizes), list(depths)),
              "hidden_size": hidden_size, "id2label": labels, "initializer_range": 0.02,
              "label2id": {v: int(k) for k, v in labels.items()}, "loss_ignore_index": 255, "model_type": "upernet",
              "pool_scales": [1, 2, 3, 6], "torch_dtype": "float32", "transformers_version": "4.26.0.dev0",
              "use_auxiliary_head": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = UperNetForSemanticSegmentation(UperNetConfig.from_pretrained(folder)).state_dict()
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point()
               else torch.randint(0, 1000, v.shape, generator=generator, dtype=v.dtype) for k, v in shapes.items()}
    torch.save(tensors, folder / "pytorch_model.bin")  # pickled, as transformers 4.26 saved by default
    return tensors
