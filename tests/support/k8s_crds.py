"""JSON Schemas of the custom resources deploy/k8s uses, for the fields it uses.

``kubernetes-validate`` ships the built-in API only. These cover KEDA's ScaledObject
(``keda.sh/v1alpha1``, field names and types from KEDA's CRD and the Kafka scaler's
documented metadata keys) and the Prometheus Operator's ServiceMonitor
(``monitoring.coreos.com/v1``). Objects are closed (``additionalProperties: false``),
so a misspelt field fails instead of being silently ignored by the operator.
"""

from __future__ import annotations

from typing import Any

_STR: dict[str, Any] = {"type": "string", "minLength": 1}
_INT: dict[str, Any] = {"type": "integer", "minimum": 0}
_INT_TEXT: dict[str, Any] = {"type": "string", "pattern": "^[0-9]+$"}
_BOOL_TEXT: dict[str, Any] = {"type": "string", "enum": ["true", "false"]}


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_METADATA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": _STR,
        "namespace": _STR,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
}

# The Kafka scaler's metadata (keda.sh/docs/latest/scalers/apache-kafka): every value a string.
_KAFKA_METADATA = _closed(
    {
        "bootstrapServers": _STR,
        "consumerGroup": _STR,
        "topic": _STR,
        "lagThreshold": _INT_TEXT,
        "activationLagThreshold": _INT_TEXT,
        "offsetResetPolicy": {"type": "string", "enum": ["earliest", "latest"]},
        "allowIdleConsumers": _BOOL_TEXT,
        "scaleToZeroOnInvalidOffset": _BOOL_TEXT,
        "excludePersistentLag": _BOOL_TEXT,
        "limitToPartitionsWithLag": _BOOL_TEXT,
        "partitionLimitation": _STR,
        "version": _STR,
        "sasl": _STR,
        "tls": _STR,
    },
    required=("bootstrapServers", "consumerGroup", "topic"),
)

SCALED_OBJECT: dict[str, Any] = _closed(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": _closed(
            {
                "scaleTargetRef": _closed(
                    {
                        "apiVersion": _STR,
                        "kind": _STR,
                        "name": _STR,
                        "envSourceContainerName": _STR,
                    },
                    required=("name",),
                ),
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "type": {"const": "kafka"},
                            "name": _STR,
                            "metadata": _KAFKA_METADATA,
                            "authenticationRef": _closed({"name": _STR, "kind": _STR}, ("name",)),
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                        },
                        required=("type", "metadata"),
                    ),
                },
            },
            required=("scaleTargetRef", "triggers"),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)

_LABEL_SELECTOR = _closed(
    {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    }
)

SERVICE_MONITOR: dict[str, Any] = _closed(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": _closed(
            {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": _closed(
                    {"any": {"type": "boolean"}, "matchNames": {"type": "array"}}
                ),
                "jobLabel": _STR,
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "port": _STR,
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        }
                    ),
                },
            },
            required=("selector", "endpoints"),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)

#: Schema by (apiVersion, kind).
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}
