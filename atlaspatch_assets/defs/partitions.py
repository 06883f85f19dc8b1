"""Dynamic partition sets: one partition per slide id (see core.discovery.safe_key) and per case."""

from dagster import DynamicPartitionsDefinition

SLIDES_PARTITION = "slides"
PATIENTS_PARTITION = "patients"
slides_partitions = DynamicPartitionsDefinition(name=SLIDES_PARTITION)
patients_partitions = DynamicPartitionsDefinition(name=PATIENTS_PARTITION)
