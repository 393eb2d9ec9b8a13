"""Evaluation (tmp)"""
