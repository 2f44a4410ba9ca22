"""The ``tracking`` section: optional experiment tracking (MLflow, TensorBoard), off by default.

The run folder's parquet tables stay the record of a run; a tracker receives the same rows
(:mod:`experiments.tracking`), for people who browse runs in MLflow's or TensorBoard's UI.
"""

from __future__ import annotations

from pydantic import Field

from experiments.section import Section

#: The default MLflow store: a local file store in this folder of ``output_dir``.
DEFAULT_MLFLOW_FOLDER = "mlruns"


class MlflowConfig(Section):
    """Where MLflow runs go: a tracking URI as MLflow reads it (``file:///abs/mlruns``,
    ``sqlite:///mlflow.db``, ``http://host:5000``), and the experiment that groups them."""

    uri: str | None = Field(None, description="MLflow tracking URI; default: a local file "
                                              "store in <output_dir>/mlruns")
    experiment: str = Field("edgemeta", min_length=1, description="MLflow experiment name")


class TrackingConfig(Section):
    """``mlflow: {}`` (or with a ``uri``) logs to MLflow, ``tensorboard: true`` writes event
    files under ``<run>/tensorboard``; both need the ``tracking`` extra
    (``pip install 'edgemeta[tracking]'``)."""

    mlflow: MlflowConfig | None = Field(None, description="log to MLflow; none by default")
    tensorboard: bool = Field(False, description="write TensorBoard event files into the "
                                                 "run folder")

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.tensorboard
