"""What each stage, round and campaign cost: :mod:`.meter` measures a stage, :mod:`.accounting` turns measurements
and stage metrics into cost figures and sums them, :mod:`.table` reads a round's stage records and prints them."""

from pipeline_lib.cost.accounting import prefixed, stage_cost, sum_costs, unprefixed  # noqa: F401
from pipeline_lib.cost.table import campaign_cost, format_cost_table, round_cost  # noqa: F401
