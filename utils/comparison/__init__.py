"""The comparison protocol (``python -m utils.comparison``): learning rates chosen on validation
with equal budgets, several seeds, resumable run records (``plan``), and the report with its
table and figures (``report``)."""
from .plan import ComparisonPlan, MethodPlan, RunKey, RunStore, run_comparison, summarise
from .report import write_report

__all__ = ["ComparisonPlan", "MethodPlan", "RunKey", "RunStore", "run_comparison", "summarise",
           "write_report"]
