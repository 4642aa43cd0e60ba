"""Evaluation and artifacts as Lightning callbacks: bits per byte, CORE, chat tasks, pass@k, samples, export, report card;
pre-emption (checkpoint on SIGTERM/SIGUSR1)."""

from nanochat.callbacks.val_bpb import ValBPB
from nanochat.callbacks.chat_eval import ChatEval
from nanochat.callbacks.core_eval import CoreEval
from nanochat.callbacks.export_model import ExportModel
from nanochat.callbacks.pass_at_k import PassAtK
from nanochat.callbacks.preemption import Preemption
from nanochat.callbacks.report_card import ReportCard
from nanochat.callbacks.samples import ChatSamples, Samples

__all__ = ["ChatEval", "ChatSamples", "CoreEval", "ExportModel", "PassAtK", "Preemption", "ReportCard", "Samples", "ValBPB"]
