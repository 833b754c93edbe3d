"""The MetricGold model core: codec, checkpoints, pipeline. Imports torch, never rclpy."""

from metricgold_ros.model.checkpoint import (
    Checkpoint, ModelMetadata, compute_empty_text_embedding, load_checkpoint, load_decoder,
    save_checkpoint)
from metricgold_ros.model.codec import decode_depth, encode_depth, valid_depth_mask
from metricgold_ros.model.pipeline import (
    DepthPrediction, MetricGoldPipeline, resolve_device, resolve_dtype)
from metricgold_ros.model.single_step import predict_x0_single_step, x0_from_model_output
from metricgold_ros.model.tiny import build_tiny_checkpoint

__all__ = [
    'Checkpoint', 'DepthPrediction', 'MetricGoldPipeline', 'ModelMetadata',
    'build_tiny_checkpoint', 'compute_empty_text_embedding', 'decode_depth', 'encode_depth',
    'load_checkpoint', 'load_decoder', 'predict_x0_single_step', 'resolve_device', 'resolve_dtype',
    'save_checkpoint', 'valid_depth_mask', 'x0_from_model_output',
]
