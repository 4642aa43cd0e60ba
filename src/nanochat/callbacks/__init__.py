"""Evaluation and artifacts as Lightning callbacks: validation bits-per-byte, samples, export."""

from nanochat.callbacks.bpb import ValBPB
from nanochat.callbacks.export import ExportModel
from nanochat.callbacks.samples import ChatSamples, Samples

__all__ = ["ChatSamples", "ExportModel", "Samples", "ValBPB"]
