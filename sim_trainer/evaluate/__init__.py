"""Closed-loop evaluation of a policy in ManiSkill: success with Wilson intervals, reports, videos."""
