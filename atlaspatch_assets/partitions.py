"""The `slides` dynamic partition set: one partition per slide id (see core.discovery.safe_key)."""

from dagster import DynamicPartitionsDefinition

SLIDES_PARTITION = "slides"
slides_partitions = DynamicPartitionsDefinition(name=SLIDES_PARTITION)
