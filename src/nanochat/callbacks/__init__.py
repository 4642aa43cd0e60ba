"""Lightning callbacks: evaluation during training (val bpb, any nanochat.eval evaluator, samples), the export,
the report card, and pre-emption (checkpoint on SIGTERM/SIGUSR1)."""

from nanochat.callbacks.export_model import ExportModel
from nanochat.callbacks.periodic import EvalCallback
from nanochat.callbacks.preemption import Preemption
from nanochat.callbacks.report_card import ReportCard
from nanochat.callbacks.samples import ChatSamples, Samples
from nanochat.callbacks.val_bpb import ValBPB

__all__ = ["ChatSamples", "EvalCallback", "ExportModel", "Preemption", "ReportCard", "Samples", "ValBPB"]
