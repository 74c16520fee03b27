"""``minkowski`` backend: MinkowskiEngine sparse tensors over the visible positions.

The stem runs densely; from then on each stage is an ``ME.SparseTensor`` whose coordinates
are that stage's visible positions, so every convolution is a submanifold sparse
convolution and a hidden position is never stored. The convolutions use the timm modules'
own parameter tensors, reshaped on every forward (ME's layer classes would own separate
copies): the depthwise 7x7 conv is ``MinkowskiChannelwiseConvolution``'s computation over
ME's kernel map, the 2x2 stride-2 downsampling conv is ``MinkowskiConvolutionFunction``.
The per-position part of each block is the token math of ``common.py``.

Coordinates are (batch, row, column) in stem-grid units (tensor stride 2**stage), inserted
in the order of ``sparse.visible_indices``; ME keeps the insertion order of unique
coordinates, so a stage's features are the regular (N, L_visible, C) tokens, flattened.
"""
from __future__ import annotations

import warnings

import torch

from ..masks import mask_from_visible_cells
from .common import block_pointwise, layer_norm, run_block
from .sparse import gather_tokens, scatter_tokens, visible_indices

INSTALL_HINT = (
    "the 'minkowski' backend needs MinkowskiEngine, which is not installed. Build and install it "
    "with `bash scripts/install_minkowski.sh` (README, section \"MinkowskiEngine backend\"), "
    "or choose the 'sparse' backend, which gives the same numbers in pure PyTorch."
)


def import_minkowski():
    """The ``MinkowskiEngine`` module, or ImportError naming the install script."""
    try:
        with warnings.catch_warnings():
            # A CPU-only build warns on import; running CUDA tensors on it fails loudly anyway.
            warnings.filterwarnings("ignore", message=".*CPU_ONLY.*")
            import MinkowskiEngine
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return MinkowskiEngine


def encode(encoder, images: torch.Tensor, visible_cells: torch.Tensor) -> torch.Tensor:
    ME = import_minkowski()
    grid_size = encoder.grid_size(images)
    mask = mask_from_visible_cells(visible_cells, grid_size[0] * grid_size[1])
    keep_count = visible_cells.shape[1]
    stem_out = encoder.stem(images)  # dense: the stem never mixes grid cells
    batch, _, height, width = stem_out.shape
    manager = ME.CoordinateManager(
        D=2, coordinate_map_type=ME.CoordinateMapType.CUDA if images.is_cuda else ME.CoordinateMapType.CPU,
        num_threads=torch.get_num_threads(),
    )
    indices = visible_indices(mask, grid_size, 8, keep_count)
    tokens = gather_tokens(stem_out.flatten(2).transpose(1, 2), indices)
    sparse = ME.SparseTensor(
        tokens.flatten(0, 1), coordinates=visible_coordinates(indices, width, 1), coordinate_manager=manager
    )
    for stage_index, stage in enumerate(encoder.stages):
        if stage_index > 0:
            height, width = height // 2, width // 2
            indices = visible_indices(mask, grid_size, 2 ** (3 - stage_index), keep_count)
            coordinates = visible_coordinates(indices, width, 2**stage_index)
            sparse = minkowski_downsample(ME, stage.downsample, sparse, coordinates)
        kernel_map = depthwise_kernel_map(sparse, stage.blocks[0].conv_dw.kernel_size)
        features = sparse.F
        for block in stage.blocks:
            features = run_block(encoder, minkowski_block, block, features, kernel_map, batch)
        sparse = ME.SparseTensor(features, coordinate_map_key=sparse.coordinate_map_key, coordinate_manager=manager)
    out = scatter_tokens(sparse.F.reshape(batch, indices.shape[1], -1), indices, height * width)
    return out.transpose(1, 2).reshape(batch, -1, height, width)


def visible_coordinates(indices: torch.Tensor, width: int, tensor_stride: int) -> torch.Tensor:
    """(N, L_visible) flat indices on a ``width``-wide map -> (N * L_visible, 3) int32
    ME coordinates (batch, row, column), in stem-grid units."""
    batch_ids = torch.arange(indices.shape[0], device=indices.device).unsqueeze(1).expand_as(indices)
    rows, columns = indices // width * tensor_stride, indices % width * tensor_stride
    return torch.stack([batch_ids, rows, columns], dim=-1).flatten(0, 1).int()


def me_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d weight (C_out, C_in, kh, kw) -> ME kernel (kh * kw, C_in, C_out).

    ME numbers kernel offsets with the first spatial axis (row) varying fastest; PyTorch
    flattens (kh, kw) with the column fastest. Both are cross-correlations.
    """
    return weight.permute(3, 2, 1, 0).flatten(0, 1)


def depthwise_kernel_map(features, kernel_size: tuple[int, int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Submanifold kernel map of ``features``' coordinates onto themselves:
    [(kernel offset index, input rows, output rows)], shared by all blocks of a stage."""
    manager, key = features.coordinate_manager, features.coordinate_map_key
    kernel_map = manager.kernel_map(key, key, stride=1, kernel_size=list(kernel_size), dilation=1)
    return [(offset, in_out[0].long(), in_out[1].long()) for offset, in_out in kernel_map.items()]


def channelwise_conv(conv_dw, features: torch.Tensor, kernel_map) -> torch.Tensor:
    """timm's depthwise Conv2d on (M, C) sparse-tensor features -> (M, C), over ``kernel_map``.

    The sum ``MinkowskiChannelwiseConvolution`` computes, with ``conv_dw``'s weight and bias.
    """
    # parameters in the features' dtype, as autocast would run the dense conv
    kernel = me_kernel(conv_dw.weight).squeeze(1).to(features.dtype)  # (kh * kw, C)
    out = torch.zeros_like(features)
    for offset, in_rows, out_rows in kernel_map:
        # (index_put_ rather than index_add_: the latter stalls ~0.1 s per call in CPU
        # thread sync on a loaded machine; output rows are unique within one offset)
        out.index_put_((out_rows,), features[in_rows] * kernel[offset], accumulate=True)
    return out + conv_dw.bias.to(features.dtype)


def minkowski_block(block, features: torch.Tensor, kernel_map, batch: int) -> torch.Tensor:
    """One ConvNeXt V2 block on (M, C) sparse-tensor features of ``batch`` images, equal counts each."""
    mixed = channelwise_conv(block.conv_dw, features, kernel_map)
    residual = block_pointwise(block, mixed.reshape(batch, -1, mixed.shape[-1]))
    return features + block.drop_path(residual).flatten(0, 1)


def minkowski_downsample(ME, downsample, sparse, coordinates: torch.Tensor):
    """LayerNorm + 2x2 stride-2 conv from the sparse tensor ``sparse`` onto ``coordinates``
    (the next stage's visible positions, tensor stride doubled) -> ``ME.SparseTensor``.

    The mask is nested across stages, so every output position has its four children
    among the inputs.
    """
    from MinkowskiEngineBackend._C import ConvolutionMode  # not re-exported by MinkowskiEngine

    norm, conv = downsample[0], downsample[1]
    normed = layer_norm(norm, sparse.F)
    manager = sparse.coordinate_manager
    out_key, _ = manager.insert_and_map(coordinates, [2 * s for s in sparse.tensor_stride])
    generator = ME.KernelGenerator(kernel_size=conv.kernel_size, stride=conv.stride, dilation=1, dimension=2)
    # ME's kernels exist for float32/float64 only (autocast may hand us half precision).
    dtype = normed.dtype if normed.dtype in (torch.float32, torch.float64) else torch.float32
    out = ME.MinkowskiConvolutionFunction.apply(
        normed.to(dtype), me_kernel(conv.weight).to(dtype).contiguous(), generator, ConvolutionMode.DEFAULT,
        sparse.coordinate_map_key, out_key, manager,
    )
    return ME.SparseTensor(out + conv.bias, coordinate_map_key=out_key, coordinate_manager=manager)
