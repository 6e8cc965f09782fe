"""Errors raised by iif. All bad-input errors are ``ValueError`` subclasses."""


class InputError(ValueError):
    """Data, model or settings rejected at the boundary; the message names the problem."""


class CurvatureError(ValueError):
    """The curvature could not be made positive definite within the allowed damping retries."""
