"""Input fields for saga types: each constructor gives the field's reader (which raises
ApiError naming the field) and its JSON schema from one declaration, so validation, the
OpenAPI document, GET /saga-types and the UI's forms cannot disagree."""

from saga.model import Field
from saga.validation import MAX_AMOUNT, MAX_INT, amount_field, choice_field, int_field, text_field


def text(name: str, max_length: int = 255) -> Field:
    """A non-empty string, not only whitespace, no NUL."""
    return Field(name, lambda body: text_field(body, name, max_length), {
        "type": "string", "minLength": 1, "maxLength": max_length,
        "pattern": "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"})


def integer(name: str, low: int = 1, high: int = MAX_INT) -> Field:
    return Field(name, lambda body: int_field(body, name, low, high),
                 {"type": "integer", "minimum": low, "maximum": high})


def amount(name: str = "amount") -> Field:
    """Money: a JSON number or a decimal string, more than 0, two places at most, at most
    1000000; read as a string with two places, never a float."""
    return Field(name, lambda body: amount_field(body, name), {"oneOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": int(MAX_AMOUNT),
         "multipleOf": 0.01},
        {"type": "string", "pattern": "^[0-9]{1,7}(\\.[0-9]{1,2})?$"}]})


def choice(name: str, choices, default=None) -> Field:
    schema = {"type": "string", "enum": list(choices)}
    if default is not None:
        schema["default"] = default
    return Field(name, lambda body: choice_field(body, name, choices, default), schema,
                 required=default is None)


def always(service: str):
    """A step's service that does not depend on the input."""
    return lambda data: service
