"""One error hierarchy for airflow-mlops.

Every error says what was wrong and what to do about it: ``problem`` names the setting, file,
column or object at fault, ``fix`` tells the user the next step. Both end up in the task log.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException, AirflowFailException


class MLOpsError(AirflowException):
    """Base class of every airflow-mlops error.

    :param problem: what is wrong, naming the setting, file or object at fault.
    :param fix: what the user should do about it.
    """

    def __init__(self, problem: str, *, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)


class MLOpsConfigError(MLOpsError):
    """A setting in the ``[mlops]`` configuration section is invalid or unusable."""


class ArtifactStoreError(MLOpsError):
    """Reading from or writing to the artifact store failed."""


class MLOpsArgumentError(MLOpsError, AirflowFailException, ValueError):
    """An operator, sensor or trigger got an argument it cannot work with (a DAG authoring mistake,
    e.g. a suite file that is not JSON or YAML); retrying the task cannot help."""


class MLOpsInputError(MLOpsError, AirflowFailException):
    """Input data is missing, unreadable or malformed; retrying the task cannot help.

    Derives from ``AirflowFailException`` so Airflow fails the task at once instead of retrying.
    """


class DataValidationError(MLOpsInputError):
    """A batch failed its expectation suite, or could not be read to be validated.

    The message names the file, and each failed expectation with its column and what was observed.
    """


class FeatureStoreError(MLOpsError):
    """A Feast operation failed: the registry, the offline store or the online store could not be used.

    The message names the repository (and feature view or store) and what to check.
    """


class FeatureRepoError(FeatureStoreError, AirflowFailException):
    """The Feast repository or a request to it is wrong: a missing or malformed ``feature_store.yaml``,
    definitions that do not import, an unknown feature view or feature service. Retrying cannot help."""


class TuningError(MLOpsError):
    """A hyperparameter search could not produce a result (every trial failed, or the Ray Job failed)."""


class RayClusterError(MLOpsError):
    """The Ray cluster of a ``ray`` connection cannot be reached or refused the job."""


class ServingError(MLOpsError):
    """Building, starting, switching or stopping a served model failed."""
