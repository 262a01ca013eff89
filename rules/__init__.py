"""cityops rules package."""

from rules.alerts import (
    ACTIONS,
    ALLOWED,
    OPEN_STATES,
    STATES,
    SYSTEM,
    Action,
    Actor,
    Alert,
    AlertEvent,
    AlertSource,
    AlertState,
)
from rules.backtest import BacktestError, BacktestOptions, InputCounts, StoredRange, run_backtest
from rules.baseline import BaselineBank, hour_of_week
from rules.commands import AlertCommands, AlertNotFound
from rules.durations import format_duration, parse_duration
from rules.engine import AlertSignal, Clock, Evaluator, EvaluatorOptions, SignalKind
from rules.errors import (
    ExpressionError,
    ForbiddenTransition,
    LifecycleError,
    NotPermitted,
    RuleFileError,
    RulesError,
    VersionConflict,
)
from rules.expr import parse_expression
from rules.flood import FloodGrouper, Incident
from rules.kinds import DEFAULT_KIND_PREFIXES, KindResolver, prefix_kind_resolver
from rules.lifecycle import AlertLifecycle
from rules.loader import RuleSet, load_rules_text
from rules.model import (
    ROLE_COVERS,
    ROLES,
    SEVERITIES,
    CorrelateCondition,
    Correlation,
    EscalationStep,
    Role,
    Rule,
    Severity,
    Subject,
)
from rules.report import BacktestReport, build_report
from rules.service import AlertPublisher, FanOutPublisher, MqttAlertPublisher
from rules.store import AlertAlreadyOpen, AlertStore, AlertStoreError, alert_from_row
from rules.window import SeriesWindow

__all__ = [
    "ACTIONS",
    "ALLOWED",
    "DEFAULT_KIND_PREFIXES",
    "OPEN_STATES",
    "ROLES",
    "ROLE_COVERS",
    "SEVERITIES",
    "STATES",
    "SYSTEM",
    "Action",
    "Actor",
    "Alert",
    "AlertAlreadyOpen",
    "AlertCommands",
    "AlertEvent",
    "AlertLifecycle",
    "AlertNotFound",
    "AlertPublisher",
    "AlertSignal",
    "AlertSource",
    "AlertState",
    "AlertStore",
    "AlertStoreError",
    "BacktestError",
    "BacktestOptions",
    "BacktestReport",
    "BaselineBank",
    "Clock",
    "CorrelateCondition",
    "Correlation",
    "EscalationStep",
    "Evaluator",
    "EvaluatorOptions",
    "ExpressionError",
    "FanOutPublisher",
    "FloodGrouper",
    "ForbiddenTransition",
    "Incident",
    "InputCounts",
    "KindResolver",
    "LifecycleError",
    "MqttAlertPublisher",
    "NotPermitted",
    "Role",
    "Rule",
    "RuleFileError",
    "RuleSet",
    "RulesError",
    "SeriesWindow",
    "Severity",
    "SignalKind",
    "StoredRange",
    "Subject",
    "VersionConflict",
    "alert_from_row",
    "build_report",
    "format_duration",
    "hour_of_week",
    "load_rules_text",
    "parse_duration",
    "parse_expression",
    "prefix_kind_resolver",
    "run_backtest",
]
