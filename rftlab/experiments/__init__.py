"""Compare variants, evaluate policies, write tables and figures."""

from rftlab.experiments.compare import Comparison, RunJob, compare, run_one, write_results
from rftlab.experiments.evaluation import EvaluationResult, evaluate, load_policy, pass_at_k
from rftlab.experiments.report import RunResult, aggregate, markdown_table, plot_comparison
from rftlab.experiments.tracking import PeakMemory, RunRecorder
from rftlab.experiments.variants import Budget, Variant, config_diff, import_object, instantiate

__all__ = [
    "Budget", "Comparison", "EvaluationResult", "PeakMemory", "RunJob", "RunRecorder", "RunResult", "Variant",
    "aggregate", "compare", "config_diff", "evaluate", "import_object", "instantiate", "load_policy",
    "markdown_table", "pass_at_k", "plot_comparison", "run_one", "write_results",
]
