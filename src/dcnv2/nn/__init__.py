"""nn.Module layers built on dcnv2.ops."""
__all__ = []
