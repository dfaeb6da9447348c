//! Products and prices. A price's amounts and recurrence never change after
//! it is made, as in Stripe: those parameters are unknown to an update.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;

use super::Answer;
use crate::billing::{Decimal, Interval};
use crate::error::ApiError;
use crate::gate::Call;
use crate::render::{self, Page};
use crate::state::{find, find_mut, merge_metadata, new_id, Metadata, Price, Product, Recurring};
use crate::Shared;

fn fresh(metadata: Option<Metadata>) -> Metadata {
    let mut m = Metadata::new();
    merge_metadata(&mut m, metadata.unwrap_or_default());
    m
}

pub async fn create_product(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let name = p.required("name")?;
    let description = p.string("description")?;
    let active = p.boolean("active")?.unwrap_or(true);
    let metadata = fresh(p.metadata()?);
    p.finish()?;
    let mut st = shared.lock();
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
    let body = render::product(&product);
    st.products.push(product);
    Ok(Json(body))
}

pub async fn update_product(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    let mut p = call.params();
    let name = p.string("name")?;
    let description = p.string("description")?;
    let active = p.boolean("active")?;
    let metadata = p.metadata()?;
    p.finish()?;
    let mut st = shared.lock();
    let now = st.now();
    let product =
        find_mut(&mut st.products, &id).ok_or_else(|| ApiError::no_such("product", &id))?;
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

pub async fn get_product(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    call.params().finish()?;
    let st = shared.lock();
    let product = find(&st.products, &id).ok_or_else(|| ApiError::no_such("product", &id))?;
    Ok(Json(render::product(product)))
}

pub async fn list_products(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let active = p.boolean("active")?;
    let page = Page::take(&mut p)?;
    p.finish()?;
    let st = shared.lock();
    let items = st
        .products
        .iter()
        .rev()
        .filter(|pr| active.is_none_or(|a| pr.active == a))
        .map(render::product)
        .collect();
    Ok(Json(page.list("/v1/products", items)?))
}

pub async fn create_price(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
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
    let metadata = fresh(p.metadata()?);
    p.finish()?;

    let mut st = shared.lock();
    find(&st.products, &product)
        .ok_or_else(|| ApiError::no_such_param("product", &product, "product"))?;
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
                        find(&st.meters, &meter).ok_or_else(|| {
                            ApiError::no_such_param("billing.meter", &meter, "recurring[meter]")
                        })?;
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
    let body = render::price(&price);
    st.prices.push(price);
    Ok(Json(body))
}

pub async fn update_price(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    let mut p = call.params();
    let active = p.boolean("active")?;
    let nickname = p.string("nickname")?;
    let metadata = p.metadata()?;
    p.finish()?;
    let mut st = shared.lock();
    let price = find_mut(&mut st.prices, &id).ok_or_else(|| ApiError::no_such("price", &id))?;
    if let Some(active) = active {
        price.active = active;
    }
    if nickname.is_some() {
        price.nickname = nickname;
    }
    merge_metadata(&mut price.metadata, metadata.unwrap_or_default());
    Ok(Json(render::price(price)))
}

pub async fn get_price(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    call: Call,
) -> Answer {
    call.params().finish()?;
    let st = shared.lock();
    let price = find(&st.prices, &id).ok_or_else(|| ApiError::no_such("price", &id))?;
    Ok(Json(render::price(price)))
}

pub async fn list_prices(State(shared): State<Arc<Shared>>, call: Call) -> Answer {
    let mut p = call.params();
    let product = p.string("product")?;
    let active = p.boolean("active")?;
    let lookup_keys = p.strings("lookup_keys")?;
    let page = Page::take(&mut p)?;
    p.finish()?;
    let st = shared.lock();
    let items = st
        .prices
        .iter()
        .rev()
        .filter(|pr| product.as_ref().is_none_or(|id| &pr.product == id))
        .filter(|pr| active.is_none_or(|a| pr.active == a))
        .filter(|pr| {
            lookup_keys.is_empty()
                || pr
                    .lookup_key
                    .as_ref()
                    .is_some_and(|k| lookup_keys.contains(k))
        })
        .map(render::price)
        .collect();
    Ok(Json(page.list("/v1/prices", items)?))
}
