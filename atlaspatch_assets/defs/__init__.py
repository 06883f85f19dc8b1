"""The Dagster layer: thin adapters over `core.stages` (assets, resources, partitions, jobs,
sensors, checks); `definitions.defs` is the code location."""

import logging
import warnings


def quiet_dagster_notices() -> None:
    """Dagster's beta/preview notices (about APIs we chose on purpose) and alembic's schema
    migration INFO lines are not for our users: hide them in the CLI and the code location."""
    from dagster import BetaWarning, PreviewWarning

    warnings.filterwarnings("ignore", category=BetaWarning)
    warnings.filterwarnings("ignore", category=PreviewWarning)
    logging.getLogger("alembic").setLevel(logging.WARNING)


quiet_dagster_notices()
