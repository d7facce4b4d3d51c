# Prices get a cache-write rate. A price that existed before it billed cache writes as
# plain input, so each is given its own input rate: it goes on billing exactly what it
# billed. The column is added empty, filled, then made NOT NULL, all in this one
# migration, so no database ever holds a price whose cache writes cost a made-up figure.

from django.db import migrations, models


def fill_with_input_rate(apps, schema_editor):
    Price = apps.get_model("catalog", "Price")
    Price.objects.update(cache_write_nano_per_mtok=models.F("input_nano_per_mtok"))


class Migration(migrations.Migration):

    dependencies = [
        ('catalog', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='price',
            name='cache_write_nano_per_mtok',
            field=models.BigIntegerField(null=True),
        ),
        migrations.RunPython(fill_with_input_rate, migrations.RunPython.noop),
        migrations.AlterField(
            model_name='price',
            name='cache_write_nano_per_mtok',
            field=models.BigIntegerField(),
        ),
        migrations.RemoveConstraint(
            model_name='price',
            name='price_not_negative',
        ),
        migrations.AddConstraint(
            model_name='price',
            constraint=models.CheckConstraint(condition=models.Q(('input_nano_per_mtok__gte', 0), ('output_nano_per_mtok__gte', 0), ('cached_input_nano_per_mtok__gte', 0), ('cache_write_nano_per_mtok__gte', 0)), name='price_not_negative'),
        ),
    ]
