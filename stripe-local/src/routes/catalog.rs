//! Products and prices. A price's amounts and recurrence never change after
//! it is made, as in Stripe: those parameters are unknown to an update.

use axum::extract::Path;
use axum::Json;

use super::{list_where, Answer, Object};
use crate::billing::{Decimal, Interval};
use crate::error::ApiError;
use crate::gate::Call;
use crate::render;
use crate::state::{merge_metadata, new_id, new_metadata, Meter, Price, Product, Recurring};

pub async fn create_product(call: Call) -> Answer {
    let mut p = call.params();
    let name = p.required("name")?;
    let description = p.string("description")?;
    let active = p.boolean("active")?.unwrap_or(true);
    let metadata = new_metadata(p.metadata()?);
    p.finish()?;
    let mut st = call.lock();
    let now = st.now();
    let product = Product {
        id: new_id("prod"),
        created: now,
        updated: now,
        name,
        description,
        active,
        metadata,
    };
    product.save(&mut st)
}

pub async fn update_product(Path(id): Path<String>, call: Call) -> Answer {
    let mut p = call.params();
    let name = p.string("name")?;
    let description = p.string("description")?;
    let active = p.boolean("active")?;
    let metadata = p.metadata()?;
    p.finish()?;
    let mut st = call.lock();
    let now = st.now();
    let product = Product::by_id_mut(&mut st, &id)?;
    if let Some(name) = name {
        product.name = name;
    }
    if description.is_some() {
        product.description = description;
    }
    if let Some(active) = active {
        product.active = active;
    }
    merge_metadata(&mut product.metadata, metadata.unwrap_or_default());
    product.updated = now;
    Ok(Json(render::product(product)))
}

pub async fn list_products(call: Call) -> Answer {
    let mut p = call.params();
    let active = p.boolean("active")?;
    list_where(&call, p, "/v1/products", |pr: &Product| {
        active.is_none_or(|a| pr.active == a)
    })
}

pub async fn create_price(call: Call) -> Answer {
    let mut p = call.params();
    let product = p.required("product")?;
    let currency = p.required("currency")?.to_lowercase();
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(ApiError::invalid(
            "currency",
            format!("Invalid currency: {currency}"),
        ));
    }
    let unit_amount =
        match (p.integer("unit_amount")?, p.string("unit_amount_decimal")?) {
            (Some(_), Some(_)) => return Err(ApiError::invalid(
                "unit_amount_decimal",
                "You may only specify one of these parameters: unit_amount, unit_amount_decimal.",
            )),
            (Some(cents), None) if cents >= 0 => Decimal::from_cents(cents),
            (Some(_), None) => {
                return Err(ApiError::invalid(
                    "unit_amount",
                    "Invalid unit_amount: must be at least 0.",
                ))
            }
            (None, Some(text)) => Decimal::parse(&text).ok_or_else(|| {
                ApiError::invalid("unit_amount_decimal", format!("Invalid decimal: {text}"))
            })?,
            (None, None) => return Err(ApiError::Missing("unit_amount".into())),
        };
    let recurring = p.object("recurring")?;
    let nickname = p.string("nickname")?;
    let lookup_key = p.string("lookup_key")?;
    let active = p.boolean("active")?.unwrap_or(true);
    let metadata = new_metadata(p.metadata()?);
    p.finish()?;

    let mut st = call.lock();
    Product::in_param(&st, &product, "product")?;
    let recurring = match recurring {
        None => None,
        Some(mut r) => {
            let interval = r.choice("interval", &["day", "week", "month", "year"])?;
            let interval = interval
                .and_then(|i| Interval::parse(&i))
                .ok_or_else(|| ApiError::Missing("recurring[interval]".into()))?;
            let usage = r.choice("usage_type", &["licensed", "metered"])?;
            let meter = r.string("meter")?;
            r.finish()?;
            let meter =
                match (usage.as_deref(), meter) {
                    (Some("metered"), None) => {
                        return Err(ApiError::Missing("recurring[meter]".into()))
                    }
                    (Some("metered"), Some(meter)) => {
                        Meter::in_param(&st, &meter, "recurring[meter]")?;
                        Some(meter)
                    }
                    (_, Some(_)) => return Err(ApiError::invalid(
                        "recurring[meter]",
                        "A meter can only be set on a price with recurring[usage_type]=metered.",
                    )),
                    (_, None) => None,
                };
            Some(Recurring { interval, meter })
        }
    };
    if let Some(key) = &lookup_key {
        if let Some(other) = st
            .prices
            .iter()
            .find(|pr| pr.lookup_key.as_ref() == Some(key))
        {
            return Err(ApiError::invalid(
                "lookup_key",
                format!("A price ({}) already uses that lookup key.", other.id),
            ));
        }
    }
    let price = Price {
        id: new_id("price"),
        created: st.now(),
        product,
        currency,
        unit_amount_decimal: unit_amount,
        recurring,
        nickname,
        lookup_key,
        metadata,
        active,
    };
    price.save(&mut st)
}

pub async fn update_price(Path(id): Path<String>, call: Call) -> Answer {
    let mut p = call.params();
    let active = p.boolean("active")?;
    let nickname = p.string("nickname")?;
    let metadata = p.metadata()?;
    p.finish()?;
    let mut st = call.lock();
    let price = Price::by_id_mut(&mut st, &id)?;
    if let Some(active) = active {
        price.active = active;
    }
    if nickname.is_some() {
        price.nickname = nickname;
    }
    merge_metadata(&mut price.metadata, metadata.unwrap_or_default());
    Ok(Json(render::price(price)))
}

pub async fn list_prices(call: Call) -> Answer {
    let mut p = call.params();
    let product = p.string("product")?;
    let active = p.boolean("active")?;
    let lookup_keys = p.strings("lookup_keys")?;
    list_where(&call, p, "/v1/prices", |pr: &Price| {
        product.as_ref().is_none_or(|id| &pr.product == id)
            && active.is_none_or(|a| pr.active == a)
            && (lookup_keys.is_empty()
                || pr
                    .lookup_key
                    .as_ref()
                    .is_some_and(|k| lookup_keys.contains(k)))
    })
}
